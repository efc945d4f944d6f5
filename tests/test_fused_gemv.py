"""The loop-free decode linear (<= 8 rows) against `fused_linear_ref` in float64 (interpreter on CPU, or a GPU)."""

import pytest
import torch
from kernel_utils import DEVICE, poisoned_allocations, rel_err
from test_fused_linear import make_inputs

from mexit.kernels.fused_gemv import MAX_ROWS, fused_gemv, gemv_config
from mexit.kernels.fused_linear_ref import fused_linear_ref
from mexit.ops.launches import count_launches

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # interpreter: no bf16
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPILOGUES = [dict(), dict(ln=True), dict(ln=True, gelu=True), dict(gelu=True), dict(residual=True),
             dict(residual=True, live=True), dict(ln=True, gelu=True, residual=True, live=True)]


def run(M, K, N, dtype, options, monkeypatch, config=None, seed=0):
    """The kernel and the float64 reference on the same inputs; NaN in x on frozen rows (an exited row's state
    may be anything), poisoned outputs."""
    x, w, b, ln, res = make_inputs(M, K, N, dtype, seed=seed)
    live = (torch.arange(M, device=DEVICE) % 3 != 1) if options.get("live") else None
    if live is not None:
        x[~live] = float("nan")
    kw = dict(gelu=options.get("gelu", False), residual=res if options.get("residual") else None, live=live)
    ln_arg = (*ln, 1e-5) if options.get("ln") else None
    with count_launches() as launched, poisoned_allocations(monkeypatch):
        y = fused_gemv(x, w, b, ln=ln_arg, config=config, **kw)
    assert {k: n for k, n in launched.items() if k.startswith("triton:")} == {"triton:_fused_gemv": 1}
    ref = fused_linear_ref(x.double(), w.double(), b.double(), gelu=kw["gelu"],
                           ln=(ln[0].double(), ln[1].double(), 1e-5) if ln_arg else None,
                           residual=None if kw["residual"] is None else res.double(), live=live)
    assert y.dtype == dtype and y.shape == (M, N)
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) outputs"
    if live is not None:
        assert torch.equal(y[~live], res[~live]), "a frozen row is its residual, bit for bit"
    return y, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", EPILOGUES, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
def test_every_epilogue_and_row_count(M, options, dtype, monkeypatch):
    """N = 130: not a multiple of any tile; K = 96: not a power of two (a masked 128-wide row)."""
    y, ref = run(M, 96, 130, dtype, options, monkeypatch, seed=M * 7 + len(options))
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [64, 96, 1024, 4096])
def test_row_widths(K, dtype, monkeypatch):
    for options in (dict(ln=True, gelu=True), dict(residual=True, live=True)):
        y, ref = run(3, K, 70, dtype, options, monkeypatch, seed=K)
        assert rel_err(y, ref) < TOL[dtype], (options, rel_err(y, ref))


@pytest.mark.parametrize("K,N", [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)])
def test_gpt2_medium_tiles(K, N, monkeypatch):
    """The GPU's launch settings (a few output rows per program, the whole row in one load), run under the
    interpreter on N cut to a few programs' worth plus a partial one: the code path the GPU compiles."""
    cfg = gemv_config(1, N, K)  # what the GPU gets (the interpreter's default widens BLOCK_N)
    assert cfg["BLOCK_K"] == K and cfg["BLOCK_N"] * K <= 4096
    n = 3 * cfg["BLOCK_N"] + 1 if DEVICE == "cpu" else N
    y, ref = run(1, K, n, torch.float16, dict(ln=True, gelu=True, residual=True), monkeypatch, config=cfg)
    assert rel_err(y, ref) < TOL[torch.float16]


def test_gpu_grids_have_several_programs_per_sm():
    """gpt2-medium's four block matrices at batch 1: >= 512 programs each, about 8 KB of fp16 weights each."""
    for K, N in [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]:
        cfg = gemv_config(1, N, K)
        assert -(-N // cfg["BLOCK_N"]) >= 512 and cfg["BLOCK_N"] * K * 2 <= 8192, (K, N, cfg)


@pytest.mark.parametrize("skip_cols", [None, 64, 70])
@pytest.mark.parametrize("M", [1, 5])
def test_skip_flag_leaves_skipped_columns_unwritten(M, skip_cols, monkeypatch):
    """Flag set: columns below skip_cols keep their poison, the rest are computed; flag clear: all computed."""
    x, w, b, ln, _ = make_inputs(M, 32, 160, torch.float32, seed=2)
    ref = fused_linear_ref(x, w, b, ln=(*ln, 1e-5))
    on = torch.ones(1, dtype=torch.int32, device=DEVICE)
    off = torch.zeros(1, dtype=torch.bool, device=DEVICE)
    with poisoned_allocations(monkeypatch):
        skipped = fused_gemv(x, w, b, ln=(*ln, 1e-5), skip=on, skip_cols=skip_cols, config=dict(
            ROWS=8, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1))  # tiles that straddle column 70
        full = fused_gemv(x, w, b, ln=(*ln, 1e-5), skip=off, skip_cols=skip_cols)
    first = 160 if skip_cols is None else skip_cols
    assert torch.isnan(skipped[:, :first]).all()
    torch.testing.assert_close(skipped[:, first:], ref[:, first:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N", [64, 70])
def test_skip_flag_passes_every_residual_row_through(N, monkeypatch):
    """As the tiled kernel's test: the residual, also where the last tile reaches past N."""
    x, w, b, _, res = make_inputs(5, 32, N, torch.float32, seed=4)
    on = torch.ones(1, dtype=torch.int32, device=DEVICE)
    live = torch.ones(5, dtype=torch.bool, device=DEVICE)
    with poisoned_allocations(monkeypatch):
        y = fused_gemv(x, w, b, residual=res, live=live, skip=on)
        z = fused_gemv(x, w, b, residual=res, skip=on, gelu=True)
    assert torch.equal(y, res) and torch.equal(z, res)


def test_rejects_more_rows_than_it_holds_and_bad_shapes():
    x, w, b, _, res = make_inputs(MAX_ROWS + 1, 32, 48, torch.float32)
    with pytest.raises(ValueError, match="at most 8 rows"):
        fused_gemv(x, w, b)
    with pytest.raises(ValueError, match="contiguous"):
        fused_gemv(x[:2], w.T.contiguous().T, b)
    with pytest.raises(ValueError, match="one dtype"):
        fused_gemv(x[:2], w.half(), b)
    with pytest.raises(ValueError, match="no row or K loop"):  # a config that would skip rows or columns of K
        fused_gemv(x[:3], w, b, config=dict(ROWS=2, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1))
    with pytest.raises(ValueError, match="no row or K loop"):
        fused_gemv(x[:2], w, b, config=dict(ROWS=2, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1))
