"""The whole generate path through the Triton kernels (interpreter on CPU) equals the torch path."""

import dataclasses

import pytest
from test_generate import MODES, PROMPTS, mexit_kwargs

import mexit
from mexit.frontends.api import decode_config
from mexit.ops.launches import count_launches


@pytest.mark.parametrize("case", MODES, ids=lambda c: "-".join(map(str, c.values())))
def test_greedy_triton_equals_torch(tiny_checkpoint, case):
    folder = tiny_checkpoint[0]
    torch_lm = mexit.load(folder, backend="torch")
    triton_lm = mexit.load(folder, backend="triton", fused_max_rows=64)  # the tiled kernels (a GPU's default: cuBLAS)
    kw = dict(max_new_tokens=8, eos_token_id=None, **mexit_kwargs(case))
    with count_launches() as launched:
        ours = triton_lm.generate(PROMPTS, **kw)
    assert ours.backend == "triton"
    assert launched["triton:_exit_head_merge"] == 8  # one exit stage per token
    deepest = max(4 if h == "original" else h for h in decode_config(**mexit_kwargs(case)).heads())
    assert launched["triton:_fused_linear"] == 4 * deepest * 7  # decode steps: fused blocks
    assert launched["triton:_acd_merge"] == (8 if case["mode"] == "contrast" else 0)
    assert ours.tokens == torch_lm.generate(PROMPTS, **kw).tokens


def test_seeded_sampling_through_triton(tiny_checkpoint):
    folder = tiny_checkpoint[0]
    kw = dict(max_new_tokens=8, do_sample=True, seed=11, top_p=0.9, eos_token_id=None, contrast=(4, 2))
    ours = mexit.load(folder, backend="triton").generate(PROMPTS, **kw).tokens
    assert ours == mexit.load(folder, backend="torch").generate(PROMPTS, **kw).tokens


def test_auto_backend_on_cpu_is_torch(tiny_checkpoint):
    lm = mexit.load(tiny_checkpoint[0])
    assert lm.generate([[1, 2]], max_new_tokens=2).backend == ("triton" if lm.model.device.type == "cuda"
                                                                 else "torch")


def test_kernel_probe_and_fallback(monkeypatch):
    import torch

    from mexit.ops import backend

    assert backend.probe_kernels(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None
    assert backend.probe_gemv(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None
    monkeypatch.setattr(backend, "probe_kernels", lambda device: "CompilationError: no sm_90 support")
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    with pytest.warns(UserWarning, match="cannot run on cuda.*CompilationError"):
        assert backend.resolve_backend("auto", torch.device("cuda")).name == "torch"
    assert backend.resolve_backend("triton", torch.device("cpu")).name == "triton"  # asked for: no probe


def test_probe_names_the_failing_kernel(monkeypatch):
    import torch

    from mexit.kernels import decode_attention, propagate_kv
    from mexit.ops import probe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe.probe_kernels.cache_clear()
    try:
        with monkeypatch.context() as m:  # a kernel that computes the wrong thing
            m.setattr(decode_attention, "decode_attention", lambda qkv, *a, **k: qkv[:, : qkv.shape[1] // 3] * 0)
            assert probe.probe_kernels(device) == "decode_attention (1 split) disagrees with its reference"
        probe.probe_kernels.cache_clear()
        with monkeypatch.context() as m:  # one that does not compile
            m.setattr(propagate_kv, "propagate_kv", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("PTX error")))
            assert probe.probe_kernels(device) == "propagate_kv: RuntimeError: PTX error"
    finally:
        probe.probe_kernels.cache_clear()


@pytest.fixture(scope="module")
def odd_width_checkpoint(tmp_path_factory):
    """A checkpoint whose width (96, 6 heads of 16) and vocabulary (1001) are not powers of two, as real models'
    are (GPT-2 small 768, large 1280, XL 1600; vocabulary 50257)."""
    from tiny_checkpoints import make_hf_checkpoint, write_predictors

    folder = tmp_path_factory.mktemp("odd")
    make_hf_checkpoint(folder, exits=(1, 2, 3, 4), with_tokenizer=False, n_embd=96, n_head=6, vocab_size=1001,
                       scale=0.25)
    write_predictors(folder, 96, (1, 2, 3))
    return folder


ODD_PROMPTS = [[5, 17, 1000, 3], [999], [42, 7, 128, 255, 1, 640, 12]]
ODD_MODES = {
    "original": dict(), "exit-2": dict(exit_layer=2), "acd-4-2": dict(contrast=(4, 2)),
    "acd-original-1": dict(contrast=("original", 1)),
    "dola-high": dict(dola_layers="high"), "dola-exit-heads": dict(dola_layers=[1, 2], dola_heads="exit"),
    "controls": dict(contrast=(4, 2), repetition_penalty=1.3, no_repeat_ngram_size=2),
    "speculative": dict(speculative=mexit.SpeculativeConfig(draft_exit=1, draft_len=3)),
    **{f"ee-{m}-{p}-{s}": dict(early_exit=mexit.ExitPolicy(t, measure=m, propagation=p, schedule=s))
       for m, t in (("max-prob", 0.02), ("cosine", 0.5), ("learned", 0.5))
       for p, s in (("eager", "segments"), ("deferred", "segments"), ("eager", "predicated"))},
}


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("name", ODD_MODES)
def test_every_mode_at_widths_that_are_not_powers_of_two(odd_width_checkpoint, name, engine, monkeypatch):
    """Every mode on the triton backend (kernels under the interpreter on CPU) at d = 96, V = 1001 gives the torch
    backend's tokens (and exits), on both engines; every allocation of the triton run is poisoned (NaN / -7), so
    a buffer read before it is written shows."""
    from kernel_utils import poisoned_allocations

    kw = dict(ODD_MODES[name], max_new_tokens=6, eos_token_id=None)
    policy = kw.get("early_exit")
    if policy is not None and policy.schedule == "predicated" and engine == "eager":
        pytest.skip("the predicated schedule is the static engine's")
    reference_kw = dict(kw, early_exit=dataclasses.replace(policy, schedule="segments")) if policy else kw
    want = mexit.load(odd_width_checkpoint, backend="torch", engine="eager").generate(ODD_PROMPTS, **reference_kw)
    lm = mexit.load(odd_width_checkpoint, backend="triton", engine=engine)
    with count_launches() as launched, poisoned_allocations(monkeypatch):
        got = lm.generate(ODD_PROMPTS, **kw)
    assert got.backend == "triton" and got.engine == engine
    assert any(name.startswith("triton:") for name in launched)
    assert got.tokens == want.tokens
    if policy is not None:
        assert got.exit_layers == want.exit_layers
        if policy.measure == "max-prob":  # the propagation kernel ran: some tokens left early
            assert min(min(row) for row in got.exit_layers) < 4
            assert launched["triton:_propagate_kv"] > 0 or policy.propagation == "deferred" or engine == "static"
