"""The state-propagation kernel against its PyTorch reference in float64 (interpreter on CPU, or a GPU)."""

import pytest
import torch
from kernel_utils import DEVICE

from mexit.kernels.propagate_kv import propagate_kv
from mexit.kernels.propagate_kv_ref import propagate_kv_ref
from mexit.ops.launches import count_launches


def make_inputs(L, B, H, T, hd, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = H * hd
    weights = dict(
        ln_w=1 + 0.2 * torch.randn(L, d, generator=g), ln_b=0.1 * torch.randn(L, d, generator=g),
        attn_w=torch.randn(L, 3 * d, d, generator=g) / d**0.5, attn_b=0.1 * torch.randn(L, 3 * d, generator=g),
    )
    h = torch.randn(N, d, generator=g) * 2 + 0.3
    pairs = torch.randperm(B * T, generator=g)[:N]  # distinct (row, slot) positions
    rows, slots = pairs // T, pairs % T
    cache = torch.full((2, L, B, H, T, hd), float("nan"))  # everything not written stays NaN
    cast = dict(device=DEVICE, dtype=dtype)
    return ({k: v.to(**cast) for k, v in weights.items()}, h.to(**cast), cache.to(**cast), rows.to(DEVICE),
            slots.to(DEVICE))


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,H,T,hd,N,start,end", [(4, 1, 2, 16, 16, 1, 1, 4), (4, 3, 4, 16, 8, 3, 0, 4),
                                                    (6, 5, 2, 32, 16, 7, 2, 5), (3, 8, 2, 16, 32, 20, 1, 3),
                                                    (3, 2, 6, 16, 16, 3, 0, 3)])  # d = 96
def test_matches_float64_reference(L, B, H, T, hd, N, start, end, dtype):
    weights, h, cache, rows, slots = make_inputs(L, B, H, T, hd, N, dtype, seed=N + end)
    want = cache.double()
    propagate_kv_ref(h.double(), *(w.double() for w in weights.values()), want[0], want[1], rows, slots, start,
                     end, 1e-5)
    with count_launches() as launched:
        propagate_kv(h, *weights.values(), cache[0], cache[1], rows, slots, start, end, 1e-5)
    assert launched["triton:_propagate_kv"] == 1
    written = ~torch.isnan(want)
    assert torch.equal(~torch.isnan(cache), written)  # exactly the positions of blocks start..end-1
    assert written.sum() == 2 * (end - start) * N * H * hd
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    got, ref = cache.double()[written], want[written]
    assert ((got - ref).norm() / ref.norm()).item() < tol


def test_rejects_bad_shapes():
    weights, h, cache, rows, slots = make_inputs(2, 2, 2, 16, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="shapes do not match"):
        propagate_kv(h[:, :-1], *weights.values(), cache[0], cache[1], rows, slots, 0, 2, 1e-5)
