"""The fused exit-head kernel against its PyTorch reference in float64 (interpreter on CPU, or a GPU)."""

import pytest
import torch
from kernel_utils import DEVICE, poisoned_allocations, rel_err

from mexit.kernels.exit_head import exit_head
from mexit.kernels.exit_head_ref import exit_head_ref
from mexit.ops.launches import count_launches

FIELDS = ("logits", "lse", "max_prob", "margin")


def make_inputs(E, B, V, D, dtype, seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, B, D, generator=g) * 2 + 0.5
    ln_w = 1 + 0.2 * torch.randn(D, generator=g)
    ln_b = 0.1 * torch.randn(D, generator=g)
    heads = [torch.randn(V, D, generator=g) * scale / D**0.5 * 4 for _ in range(E)]
    cast = dict(device=DEVICE, dtype=dtype)
    return x.to(**cast), ln_w.to(**cast), ln_b.to(**cast), [h.to(**cast) for h in heads]


def check_against_float64(E, B, V, D, dtype, monkeypatch, with_logprobs=True):
    x, ln_w, ln_b, heads = make_inputs(E, B, V, D, dtype, seed=B * 7 + V)
    with count_launches() as launched, poisoned_allocations(monkeypatch):
        out = exit_head(x, ln_w, ln_b, 1e-5, heads, with_logprobs=with_logprobs)
    assert launched["triton:_exit_head_merge"] == 1
    ref = exit_head_ref(x.double(), ln_w.double(), ln_b.double(), 1e-5, [h.double() for h in heads],
                        with_logprobs=True)
    for name in FIELDS + (("logprobs",) if with_logprobs else ()):
        # fp16 rounds the normalized rows before the dot; the margin, a difference of two probabilities, amplifies
        # that relative error
        tol = 1e-5 if dtype == torch.float32 else 1e-2 if name == "margin" else 3e-3
        if dtype == torch.bfloat16:  # 8 mantissa bits
            tol *= 8
        ours = getattr(out, name)
        assert not torch.isnan(ours).any(), f"{name} has unwritten (NaN-poisoned) elements"
        assert ours.dtype == torch.float32 and ours.shape == getattr(ref, name).shape
        assert rel_err(ours, getattr(ref, name)) < tol, (name, rel_err(ours, getattr(ref, name)))
    assert (out.argmax >= 0).all()
    # argmax: the reference's argmax, unless the top two logits are closer than the kernel's rounding
    top2 = ref.logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert torch.equal(out.argmax[clear].cpu(), ref.argmax[clear].cpu())
    assert (out.logprobs is not None) == with_logprobs


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # interpreter: no bf16


@pytest.mark.parametrize("E,B,V,D", [(2, 1, 257, 32), (1, 3, 97, 48), (2, 7, 1000, 64), (2, 64, 301, 32),
                                     (1, 17, 50, 16), (2, 33, 129, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_shapes(E, B, V, D, dtype, monkeypatch):
    check_against_float64(E, B, V, D, dtype, monkeypatch)


def test_gpt2_medium_head_shape(monkeypatch):
    """gpt2-medium's vocabulary 50257 (odd: 393 tiles, the last partial), two exits, batch 3, at d = 256 (four
    BLOCK_D steps; the interpreter's time grows with d: d = 1024 itself compiles in bench/aot_compile.py and runs in
    bench_exit_head.py on a GPU)."""
    check_against_float64(2, 3, 50257, 256, torch.float16, monkeypatch, with_logprobs=False)


def test_ties_break_to_first_index():
    """One-hot head rows make every logit exactly one normalized feature, so ties are exact whatever the
    summation order: winners in different tiles (200, 260) for exit 0 and in one tile (7, 9) for exit 1."""
    V, D = 300, 32
    x, ln_w, ln_b, _ = make_inputs(2, 1, V, D, torch.float32, seed=3)
    ln_w, ln_b = torch.ones_like(ln_w), torch.zeros_like(ln_b)
    top = torch.nn.functional.layer_norm(x, (D,)).argmax(-1).flatten().tolist()
    heads = []
    for e, winners in enumerate([(200, 260), (7, 9)]):
        head = torch.zeros(V, D, device=DEVICE)
        head[torch.arange(V), torch.arange(V) % D] = 0.5
        head[list(winners)] = 0.0
        head[list(winners), top[e]] = 1.0
        heads.append(head)
    out = exit_head(x, ln_w, ln_b, 1e-5, heads)
    assert out.argmax.flatten().tolist() == [200, 7]
    assert out.margin.abs().max() == 0  # the two top logits are equal


def test_rejects_bad_shapes():
    x, ln_w, ln_b, heads = make_inputs(2, 2, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="one or two exits"):
        exit_head(x, ln_w, ln_b, 1e-5, heads[:1])
    with pytest.raises(ValueError, match="heads must be contiguous"):
        exit_head(x, ln_w, ln_b, 1e-5, [heads[0], heads[1].T.contiguous().T])


def test_skip_flag(monkeypatch):
    """Flag set: nothing is written (every output keeps its poison); flag clear: the normal result."""
    x, ln_w, ln_b, heads = make_inputs(2, 3, 301, 32, torch.float32)
    on = torch.ones(1, dtype=torch.bool, device=DEVICE)
    off = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with poisoned_allocations(monkeypatch):
        skipped = exit_head(x, ln_w, ln_b, 1e-5, heads, with_logprobs=True, skip=on)
        ran = exit_head(x, ln_w, ln_b, 1e-5, heads, with_logprobs=True, skip=off)
    assert all(torch.isnan(getattr(skipped, name)).all() for name in FIELDS + ("logprobs",))
    assert (skipped.argmax == -7).all()
    ref = exit_head_ref(x, ln_w, ln_b, 1e-5, heads, with_logprobs=True)
    for name in FIELDS + ("logprobs",):
        torch.testing.assert_close(getattr(ran, name), getattr(ref, name), rtol=1e-4, atol=1e-5)


def test_layernorm_statistics_from_one_load_where_the_rows_fit():
    """The exit head and state propagation read a row block's statistics in one load up to ONE_LOAD_MAX elements
    (gpt2-medium at batch <= 16); wider blocks, and the tiled fused-linear kernel, step through K."""
    from mexit.kernels.tiles import one_load_width

    assert one_load_width(16, 1024) == 1024 and one_load_width(1, 96) == 128
    assert one_load_width(64, 1024) == 0 and one_load_width(16, 1600) == 0
