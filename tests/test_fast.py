"""The static decode step (the body CUDA graphs capture) equals the eager loop; on CUDA, graph replay too."""

import dataclasses

import pytest
import torch
from test_generate import MODES, PROMPTS, mexit_kwargs

import mexit
from mexit.engines.static import StaticEngine, StaticState, batch_bucket, length_bucket
from mexit.frontends.api import resolve_engine
from mexit.ops.launches import count_launches

ENGINES = ["static"] + (["graph"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    return mexit.load(tiny_checkpoint[0], device=DEVICE, engine="eager")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", MODES, ids=lambda c: "-".join(map(str, c.values())))
def test_greedy_equals_eager(tiny_checkpoint, eager, engine, case):
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    kw = dict(max_new_tokens=12, eos_token_id=None, **mexit_kwargs(case))
    out = fast.generate(PROMPTS, **kw)
    assert out.engine == engine
    assert out.tokens == eager.generate(PROMPTS, **kw).tokens
    for prompt in PROMPTS:  # single rows reuse bucket 1; the 3-row batch used bucket 4 (one filler row)
        assert fast.generate([prompt], **kw).tokens == eager.generate([prompt], **kw).tokens


@pytest.mark.parametrize("case", MODES[::2], ids=lambda c: "-".join(map(str, c.values())))
def test_fused_layers_equal_torch_path(tiny_checkpoint, eager, case):
    """The triton backend's static step (fused-linear blocks, the kernels a graph captures) equals the torch
    backend's eager loop."""
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine="static", backend="triton", fused_max_rows=64)
    kw = dict(max_new_tokens=8, eos_token_id=None, **mexit_kwargs(case))
    with count_launches() as launched:
        out = fast.generate(PROMPTS, **kw)
    assert out.backend == "triton" and launched["triton:_fused_linear"] > 0
    assert out.tokens == eager.generate(PROMPTS, **kw).tokens


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", MODES[::2], ids=lambda c: "-".join(map(str, c.values())))
def test_gemv_blocks_equal_torch_path(tiny_checkpoint, eager, engine, case):
    """Every mode on the loop-free GEMV block linears (up to 8 rows: single prompts, the 3-row batch in bucket 4)
    gives the eager torch loop's tokens; counted on the static engine, replayed on the graph engine (GPU)."""
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine, backend="triton", gemv_max_rows=8)
    kw = dict(max_new_tokens=8, eos_token_id=None, **mexit_kwargs(case))
    with count_launches() as launched:
        out = fast.generate(PROMPTS, **kw)
    if engine == "static":
        assert launched["triton:_fused_gemv"] > 0 and launched["triton:_fused_linear"] == 0
    assert out.tokens == eager.generate(PROMPTS, **kw).tokens
    assert fast.generate(PROMPTS[:1], **kw).tokens == eager.generate(PROMPTS[:1], **kw).tokens


def test_gemv_blocks_in_speculative_dola_and_repetition_controls(tiny_checkpoint, eager):
    """Self-speculative decoding (draft, verify: a batch of positions per row), DoLa and the repetition controls on
    the GEMV block linears give the eager torch loop's tokens (speculation: full depth's)."""
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=ENGINES[-1], backend="triton", gemv_max_rows=8)
    for kw in (dict(speculative=mexit.SpeculativeConfig(2, 3)), dict(dola_layers="high"),
               dict(repetition_penalty=1.3, no_repeat_ngram_size=2)):
        want = eager.generate(PROMPTS, 8, eos_token_id=None, **({} if "speculative" in kw else kw)).tokens
        assert fast.generate(PROMPTS, 8, eos_token_id=None, **kw).tokens == want, kw


@pytest.mark.parametrize("engine", ENGINES)
def test_reused_across_calls_and_sampling(tiny_checkpoint, eager, engine):
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    kw = dict(max_new_tokens=10, eos_token_id=None, contrast=(4, 2))
    first = fast.generate(PROMPTS, **kw).tokens
    fast.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 3, **kw)  # same bucket, other contents
    assert fast.generate(PROMPTS, **kw).tokens == first
    assert len(fast._engine.states) == 1
    sample = dict(max_new_tokens=10, eos_token_id=None, do_sample=True, seed=5, top_p=0.9, exit_layer=3)
    assert fast.generate(PROMPTS, **sample).tokens == eager.generate(PROMPTS, **sample).tokens


@pytest.mark.parametrize("engine", ENGINES)
def test_eos_and_streaming(tiny_checkpoint, eager, engine):
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    free = eager.generate(PROMPTS, max_new_tokens=40, eos_token_id=None).tokens
    eos = free[1][2]
    streamed = []
    out = fast.generate(PROMPTS, max_new_tokens=40, eos_token_id=eos, on_token=lambda t: streamed.append(t.tolist()))
    assert out.tokens == eager.generate(PROMPTS, max_new_tokens=40, eos_token_id=eos).tokens
    assert [row[0] for row in streamed][: len(out.tokens[0])] == out.tokens[0]


def test_buckets_and_engines():
    assert [batch_bucket(b) for b in (1, 3, 5, 64, 65, 130)] == [1, 4, 8, 64, 128, 192]
    assert [length_bucket(n, 1024) for n in (1, 128, 129, 1000, 1024)] == [128, 128, 256, 1024, 1024]
    assert length_bucket(100, 64) == 64
    assert resolve_engine("auto", torch.device("cpu")) == "eager"
    assert resolve_engine("auto", torch.device("cuda")) == "graph"
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        assert resolve_engine("graph", torch.device("cpu")) == "static"
    with pytest.raises(ValueError, match="unknown engine"):
        resolve_engine("turbo", torch.device("cpu"))


def test_static_step_has_no_host_sync(tiny_checkpoint):
    """The step body must be capturable: on CPU, check it never reads a device value into Python."""
    lm = mexit.load(tiny_checkpoint[0], engine="static")
    lm.generate(PROMPTS, max_new_tokens=3, contrast=(4, 2), eos_token_id=None)
    step = next(iter(lm._engine.states.values()))
    assert isinstance(step, StaticState)
    calls = []
    real_item, real_bool, real_tolist = torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist
    try:
        torch.Tensor.item = lambda self: calls.append("item") or real_item(self)
        torch.Tensor.__bool__ = lambda self: calls.append("bool") or real_bool(self)
        torch.Tensor.tolist = lambda self: calls.append("tolist") or real_tolist(self)
        with torch.inference_mode():
            step.run_step()
    finally:
        torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist = real_item, real_bool, real_tolist
    assert calls == []


def test_compiled_static_step_equals_eager(tiny_checkpoint, eager):
    """torch.compile of the static step's layers (fixed mode and early-exit segments) changes no token."""
    from mexit.decoding.early_exit import ExitPolicy

    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=ENGINES[-1], compile=True)
    kw = dict(max_new_tokens=8, eos_token_id=None)
    assert fast.generate(PROMPTS, contrast=(4, 2), **kw).tokens == eager.generate(PROMPTS, contrast=(4, 2), **kw).tokens
    policy = ExitPolicy(0.3, exits=(2,))
    ours, theirs = fast.generate(PROMPTS, early_exit=policy, **kw), eager.generate(PROMPTS, early_exit=policy, **kw)
    assert ours.tokens == theirs.tokens and ours.exit_layers == theirs.exit_layers


def test_compile_with_triton_backend_warns_and_runs_the_fused_kernels(tiny_checkpoint, eager):
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=ENGINES[-1], backend="triton", compile=True)
    with pytest.warns(UserWarning, match="already fused kernels: not compiling"):
        out = fast.generate(PROMPTS, max_new_tokens=4, eos_token_id=None)
    (state,) = fast._engine.states.values()
    assert not state.compile_layers  # the blocks are not wrapped by torch.compile
    assert out.tokens == eager.generate(PROMPTS, max_new_tokens=4, eos_token_id=None).tokens


def test_capture_failure_falls_back_to_the_static_step(tiny_checkpoint, eager, monkeypatch):
    def broken_capture(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticState, "capture", broken_capture)
    lm = mexit.load(tiny_checkpoint[0], device=DEVICE, engine="static")
    lm._engine = StaticEngine(graph=True)  # as on a CUDA machine
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = lm.generate(PROMPTS, max_new_tokens=6, eos_token_id=None)
    assert out.engine == "static"
    assert out.tokens == eager.generate(PROMPTS, max_new_tokens=6, eos_token_id=None).tokens


@pytest.mark.parametrize("case", MODES[:4], ids=lambda c: "-".join(map(str, c.values())))
def test_fp16_fast_path_equals_fp16_eager(tiny_checkpoint, case):
    """The dtype users run on GPUs: the static/graph step and the eager loop give the same tokens in fp16."""
    kw = dict(max_new_tokens=10, eos_token_id=None, **mexit_kwargs(case))
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, dtype="fp16", engine=ENGINES[-1])
    slow = mexit.load(tiny_checkpoint[0], device=DEVICE, dtype="fp16", engine="eager")
    assert fast.generate(PROMPTS, **kw).tokens == slow.generate(PROMPTS, **kw).tokens


def test_large_batch_uses_torch_matmuls_and_the_attention_kernel(tiny_checkpoint, eager):
    """Above `fused_max_rows` rows (here set to 16) the static step keeps torch's matmuls but attends through the
    decode-attention kernel (it reads only the slots written so far); tokens equal the eager torch loop. Counted on
    the static engine (a graph's replays launch nothing a counter sees)."""
    prompts = [PROMPTS[i % len(PROMPTS)][: 2 + i % 5] for i in range(19)]  # bucket 32
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine="static", backend="triton")
    fast.with_backend(fused_max_rows=16)
    with count_launches() as launched:
        out = fast.generate(prompts, max_new_tokens=5, eos_token_id=None, exit_layer=3)
    assert launched["triton:_fused_linear"] == 0
    assert launched["triton:_decode_attention"] == 3 * 4  # 3 blocks, 4 decode steps
    assert out.tokens == eager.generate(prompts, max_new_tokens=5, eos_token_id=None, exit_layer=3).tokens


def test_long_cache_splits_the_attention(tmp_path):
    """A 640-slot cache at batch 1 takes the flash-decoding path (splits + merge); tokens equal the torch path."""
    from tiny_checkpoints import make_hf_checkpoint

    from mexit.kernels import decode_attention

    make_hf_checkpoint(tmp_path, n_positions=1024)
    prompt = [int(t) for t in torch.randint(256, (520,), generator=torch.Generator().manual_seed(0))]
    fast = mexit.load(tmp_path, device=DEVICE, engine=ENGINES[-1], backend="triton")
    reference = mexit.load(tmp_path, device=DEVICE, engine="eager", backend="torch")
    assert decode_attention.choose_splits(1, 4, 640, torch.device(DEVICE)) > 1
    out = fast.generate([prompt], max_new_tokens=4, eos_token_id=None, contrast=(4, 2))
    assert out.tokens == reference.generate([prompt], max_new_tokens=4, eos_token_id=None, contrast=(4, 2)).tokens


def test_pdl_gives_the_same_tokens_or_warns_where_it_cannot_run(tiny_checkpoint, eager):
    """On a Hopper-or-newer GPU the PDL kernels (captured in CUDA graphs) give the eager tokens in every mode;
    elsewhere (CPU, the interpreter) pdl=True says it cannot run and generates the same tokens without it."""
    from mexit.decoding.early_exit import ExitPolicy
    from mexit.kernels.launch import pdl_supported

    if pdl_supported(torch.device(DEVICE)):
        fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=ENGINES[-1], backend="triton", pdl=True)
        assert fast.pdl is True
    else:
        with pytest.warns(UserWarning, match="pdl=True needs the triton backend"):
            fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine="static", backend="triton", pdl=True)
        assert fast.pdl is False
    kw = dict(max_new_tokens=4, eos_token_id=None)
    predicated = ExitPolicy(0.3, exits=(2,), schedule="predicated")
    reference = dataclasses.replace(predicated, schedule="segments")  # the eager engine's scheduler
    for mode, theirs in (({}, {}), (dict(contrast=(4, 2)),) * 2, (dict(early_exit=predicated),
                                                                   dict(early_exit=reference))):
        assert fast.generate(PROMPTS, **mode, **kw).tokens == eager.generate(PROMPTS, **theirs, **kw).tokens


@pytest.mark.parametrize("engine", ENGINES)
def test_cache_and_logits_on_the_static_engines(tiny_checkpoint, eager, engine):
    """return_cache and keep_logits run on the engine asked for (no silent switch to eager) and give the eager
    engine's cache (real rows, every slot written) and logits."""
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    kw = dict(max_new_tokens=6, eos_token_id=None, contrast=(4, 2), return_cache=True, keep_logits=True)
    ours, theirs = fast.generate(PROMPTS, **kw), eager.generate(PROMPTS, **kw)
    assert ours.engine == engine and ours.tokens == theirs.tokens
    used = theirs.cache.valid.shape[1] - 1  # the last token is never fed
    assert torch.equal(ours.cache.valid[:, :used], theirs.cache.valid[:, :used])
    torch.testing.assert_close(ours.cache.k[:, :, :, :used], theirs.cache.k[:, :, :, :used], atol=1e-5, rtol=1e-5)
    assert len(ours.logits) == len(theirs.logits) == 6
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_backend_settings_are_part_of_the_step_key(tiny_checkpoint):
    """A static step is built for one Backend: changing the fused-row cut-off builds another, never reuses one
    captured for other kernels."""
    fast = mexit.load(tiny_checkpoint[0], engine="static", backend="triton")
    fast.generate(PROMPTS, max_new_tokens=2, eos_token_id=None)
    fast.with_backend(fused_max_rows=0)
    with count_launches() as launched:
        fast.generate(PROMPTS, max_new_tokens=2, eos_token_id=None)
    assert len(fast._engine.states) == 2 and launched["triton:_fused_linear"] == 0


def test_one_dtype_rule_and_the_drop_in_keeps_its_settings(tiny_checkpoint):
    from mexit.decoding.fixed import DecodeConfig
    from mexit.frontends.compat import FastMultiExitModel
    from mexit.model.placement import resolve_dtype

    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert mexit.load(tiny_checkpoint[0]).model.dtype == (torch.float16 if DEVICE == "cuda" else torch.float32)
    with pytest.warns(UserWarning, match="pdl=True needs"):
        lm = mexit.load(tiny_checkpoint[0], device="cpu", backend="triton", engine="static", pdl=True)
    model = FastMultiExitModel(lm, DecodeConfig())
    with pytest.warns(UserWarning, match="pdl=True needs"):  # asked for again: the setting travels
        model.half()
    assert model.dtype == torch.float16 and model.lm.settings["pdl"] is True and model.lm.engine == "static"
