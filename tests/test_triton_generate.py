"""The whole generate path through the Triton kernels (interpreter on CPU) equals the torch path."""

import pytest
from test_generate import MODES, PROMPTS, mexit_kwargs

import mexit
from mexit.frontends.api import decode_config
from mexit.ops.launches import count_launches


@pytest.mark.parametrize("case", MODES, ids=lambda c: "-".join(map(str, c.values())))
def test_greedy_triton_equals_torch(tiny_checkpoint, case):
    folder = tiny_checkpoint[0]
    torch_lm = mexit.load(folder, backend="torch")
    triton_lm = mexit.load(folder, backend="triton")
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
