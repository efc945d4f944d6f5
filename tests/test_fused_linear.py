"""The fused decode linear against its PyTorch reference in float64 (interpreter on CPU, or a GPU)."""

import pytest
import torch
from kernel_utils import DEVICE, poisoned_allocations, rel_err

from mexit.kernels.fused_linear import fused_linear
from mexit.kernels.fused_linear_ref import fused_linear_ref
from mexit.ops.launches import count_launches


def make_inputs(M, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 1.5 + 0.3
    w = torch.randn(N, K, generator=g) / K**0.5
    b = 0.1 * torch.randn(N, generator=g)
    ln = (1 + 0.2 * torch.randn(K, generator=g), 0.1 * torch.randn(K, generator=g))
    res = torch.randn(M, N, generator=g)
    cast = dict(device=DEVICE, dtype=dtype)
    return x.to(**cast), w.to(**cast), b.to(**cast), tuple(t.to(**cast) for t in ln), res.to(**cast)


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # interpreter: no bf16
OPTIONS = [dict(), dict(ln=True), dict(ln=True, gelu=True), dict(residual=True), dict(gelu=True, residual=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("M,K,N", [(1, 48, 96), (3, 32, 200), (7, 64, 33), (64, 40, 130)])
def test_matches_float64_reference(M, K, N, dtype, options, monkeypatch):
    x, w, b, ln, res = make_inputs(M, K, N, dtype, seed=M * 31 + N)
    kw = dict(gelu=options.get("gelu", False))
    with count_launches() as launched, poisoned_allocations(monkeypatch):
        y = fused_linear(x, w, b, ln=(*ln, 1e-5) if options.get("ln") else None,
                         residual=res if options.get("residual") else None, **kw)
    assert launched["triton:_fused_linear"] == 1
    ref = fused_linear_ref(x.double(), w.double(), b.double(),
                           ln=(ln[0].double(), ln[1].double(), 1e-5) if options.get("ln") else None,
                           residual=res.double() if options.get("residual") else None, **kw)
    assert y.dtype == dtype and y.shape == (M, N)
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) outputs"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(y, ref) < tol, rel_err(y, ref)


def test_gpt2_medium_mlp_shape(monkeypatch):
    """c_fc at gpt2-medium width (d = 1024 -> 4096) for one decode row, fp16: layernorm + gelu."""
    x, w, b, ln, _ = make_inputs(1, 1024, 4096, torch.float16, seed=5)
    with poisoned_allocations(monkeypatch):
        y = fused_linear(x, w, b, ln=(*ln, 1e-5), gelu=True)
    ref = fused_linear_ref(x.double(), w.double(), b.double(), ln=(ln[0].double(), ln[1].double(), 1e-5), gelu=True)
    assert rel_err(y, ref) < 2e-3


@pytest.mark.parametrize("skip_cols", [None, 64, 70])
def test_skip_flag_leaves_skipped_columns_unwritten(skip_cols, monkeypatch):
    """Flag set: columns below skip_cols keep their poison, the rest are computed; flag clear: all computed."""
    x, w, b, ln, _ = make_inputs(3, 32, 160, torch.float32, seed=2)
    ref = fused_linear_ref(x, w, b, ln=(*ln, 1e-5))
    on = torch.ones(1, dtype=torch.int32, device=DEVICE)
    off = torch.zeros(1, dtype=torch.bool, device=DEVICE)
    with poisoned_allocations(monkeypatch):
        skipped = fused_linear(x, w, b, ln=(*ln, 1e-5), skip=on, skip_cols=skip_cols)
        full = fused_linear(x, w, b, ln=(*ln, 1e-5), skip=off, skip_cols=skip_cols)
    first = 160 if skip_cols is None else skip_cols
    assert torch.isnan(skipped[:, :first]).all()
    torch.testing.assert_close(skipped[:, first:], ref[:, first:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 3, 7, 17, 64])
def test_frozen_rows_pass_their_residual_through_bit_for_bit(M, monkeypatch):
    """live False: the row is the residual exactly (x there is NaN, as an exited row's garbage may be); live
    rows equal the reference. Odd row counts cross the 16- and 32-row blocks."""
    x, w, b, ln, res = make_inputs(M, 48, 96, torch.float16, seed=M)
    live = torch.arange(M, device=DEVICE) % 3 != 1
    x[~live] = float("nan")
    with poisoned_allocations(monkeypatch):
        y = fused_linear(x, w, b, gelu=True, residual=res, live=live)
    assert torch.equal(y[~live], res[~live])
    ref = fused_linear_ref(x.double(), w.double(), b.double(), gelu=True, residual=res.double(), live=live)
    assert rel_err(y[live], ref[live]) < 2e-3
    assert torch.equal(fused_linear_ref(x, w, b, gelu=True, residual=res, live=live)[~live], res[~live])


@pytest.mark.parametrize("N", [64, 70])
def test_skip_flag_passes_every_residual_row_through(N, monkeypatch):
    """Flag set on a residual kernel: the output is the residual (no weight read), whatever `live` says; N = 70:
    the last tile reaches past N (such a tile once computed nothing and copied nothing: unwritten outputs)."""
    x, w, b, _, res = make_inputs(5, 32, N, torch.float32, seed=4)
    on = torch.ones(1, dtype=torch.int32, device=DEVICE)
    live = torch.ones(5, dtype=torch.bool, device=DEVICE)
    with poisoned_allocations(monkeypatch):
        y = fused_linear(x, w, b, residual=res, live=live, skip=on)
        z = fused_linear(x, w, b, residual=res, skip=on)
    assert torch.equal(y, res) and torch.equal(z, res)


def test_rejects_bad_shapes_and_dtypes():
    x, w, b, ln, res = make_inputs(2, 32, 48, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        fused_linear(x, w.T.contiguous().T, b)
    with pytest.raises(ValueError, match="bias"):
        fused_linear(x, w, b[:-1])
    with pytest.raises(ValueError, match="residual"):
        fused_linear(x, w, b, residual=res[:1])
    with pytest.raises(ValueError, match="live rows"):
        fused_linear(x, w, b, live=torch.ones(2, dtype=torch.bool, device=x.device))
    with pytest.raises(ValueError, match="one dtype"):
        fused_linear(x, w.half(), b)
