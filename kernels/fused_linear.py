"""Fused decode linear: [layernorm ->] x @ W + b [-> gelu] [+ residual], with optional frozen rows and a skip flag.

One kernel per GPT-2 block matmul at decode time (few rows, memory-bound): the layernorm is a prologue (each
program normalizes its rows with fp32 statistics), bias, tanh-gelu and the residual add are an epilogue, so a
block is 4 of these plus attention instead of ~12 separate kernels. Grid = row blocks x column tiles, row blocks
fastest, so the programs that share a weight tile run side by side and all but the first read it from L2; each
program reads its BLOCK_N output rows of the weight (stored [N, K]) once, fp32 accumulation. The tiled kernel for
any row count up to 64; `fused_gemv` is the loop-free one for up to 8 rows.

Early exit inside the kernels (no torch operation between them):
- `live` ([M] bool): rows that have exited are frozen: a kernel with a residual writes the residual unchanged
  for them, so a block passes a frozen row's state through and the next block's key/value of that row is state
  propagation from it.
- `skip` ([1] int32/bool, set once no row is running): every row is frozen; columns [0, skip_cols) are not
  computed (programs whose tile lies there read no weight): a residual kernel copies its residual through, the
  others leave those columns unwritten. A block then reads only the key/value columns of c_attn.

With `pdl` (Hopper and newer, compiled), a program first lets the next kernel launch, then loads its first weight
tile and only then waits on the previous kernel (`gdc_wait`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreted, pdl_options
from .tiles import ln_matmul, weight_tile


@triton.jit
def _tanh(u):
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # no libdevice under the interpreter; saturates to +-1


@triton.jit
def _fused_linear(
    x_ptr, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, res_ptr, live_ptr, skip_ptr, y_ptr,
    M, N, K, skip_cols, eps,
    HAS_LN: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_LIVE: tl.constexpr,
    HAS_SKIP: tl.constexpr, FP32_IEEE: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    if USE_PDL:  # first: the next kernel may launch and issue its weight loads (it waits before reading)
        tl.extra.cuda.gdc_launch_dependents()
    PREFETCH: tl.constexpr = USE_PDL and not HAS_SKIP  # a skippable kernel reads no weight before its flag
    w_first = col_ok
    if PREFETCH:
        w_first = weight_tile(w_ptr, K, 0, K, cols, col_ok, BLOCK_K)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    compute = True
    live = row_ok
    if HAS_LIVE:
        live = live & (tl.load(live_ptr + rows, mask=row_ok, other=0).to(tl.int32) != 0)
    if HAS_SKIP:
        skip_flag = tl.load(skip_ptr).to(tl.int32)
        first_col = tl.where(skip_flag != 0, skip_cols, 0)  # first column to compute
        # a tile computes if it holds a column in [first_col, N) (a last tile may reach past N = first_col)
        compute = (pid_n * BLOCK_N + BLOCK_N > first_col) & (first_col < N)
        col_ok = col_ok & (cols >= first_col)
        live = live & (skip_flag == 0)
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if compute:
        acc = ln_matmul(x_ptr + rows.to(tl.int64)[:, None] * K, row_ok, w_ptr, K, cols, col_ok, ln_w_ptr, ln_b_ptr,
                        K, eps, w_first, HAS_LN, FP32_IEEE, PREFETCH, BLOCK_M, BLOCK_N, BLOCK_K, 0)
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + _tanh(0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)))
        if HAS_RES:
            residual = tl.load(res_ptr + offsets, mask=out_ok, other=0.0).to(tl.float32)
            acc = tl.where(live[:, None], acc + residual, residual)  # frozen rows pass their input through
        tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    elif HAS_RES:  # a skipped tile of a residual kernel: every row is frozen
        tile_ok = row_ok[:, None] & (cols < N)[None, :]
        tl.store(y_ptr + offsets, tl.load(res_ptr + offsets, mask=tile_ok), mask=tile_ok)


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                      live: torch.Tensor | None) -> None:
    """ValueError unless x [M, K], weight contiguous [N, K], bias [N], residual [M, N], live [M] (with a residual)
    fit together in one dtype."""
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape != (N, K) or not weight.is_contiguous() or bias.shape != (N,):
        raise ValueError(f"weight must be contiguous [N, {K}] with bias [N], got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    if residual is not None and residual.shape != (M, N):
        raise ValueError(f"residual must be [{M}, {N}], got {tuple(residual.shape)}")
    if live is not None and (residual is None or live.shape != (M,)):
        raise ValueError(f"live rows need a residual and shape [{M}]")
    if len({t.dtype for t in (x, weight, bias) + (() if residual is None else (residual,))}) != 1:
        raise ValueError("x, weight, bias and residual must share one dtype")


def tile_config(rows: int, cols: int) -> dict:
    """Block sizes per row and column count: narrow column tiles give enough programs to stream the weight at full
    bandwidth (c_proj has only 1024 columns: 64 tiles of 16). Up to 16 rows: one row block (tl.dot needs >= 16).
    17 to 64 rows: row blocks of 32, so c_proj still has 128 programs for an H100's 132 SMs and each weight tile is
    read from DRAM once and from L2 at most once more (row blocks of 16 would read it 4 times from L2 at 64 rows;
    one block of 64 would leave c_proj 64 programs). All spill-free on sm_90a / sm_80 (bench/aot_compile.py);
    throughput unmeasured: bench/bench_fused_linear.py --sweep measures the alternatives on a GPU."""
    block_n = 16 if cols <= 1024 else 32
    if rows <= 16:
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows <= 64:
        # 4 warps spill, 3 stages too; K tiles of 128 spilled 28 bytes with PDL and a residual (sm_90a, triton 3.9)
        return dict(BLOCK_M=32, BLOCK_N=block_n, BLOCK_K=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3)  # 4 warps spill (triton 3.6)


def interpreter_config(rows: int, cols: int, k: int) -> dict:
    """Under the interpreter: one row block and tiles of up to 256 x 256 (a handful of programs)."""
    return dict(BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=min(256, triton.next_power_of_2(cols)),
                BLOCK_K=min(256, triton.next_power_of_2(k)), num_warps=4, num_stages=1)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 ln: tuple[torch.Tensor, torch.Tensor, float] | None = None, gelu: bool = False,
                 residual: torch.Tensor | None = None, live: torch.Tensor | None = None,
                 skip: torch.Tensor | None = None, skip_cols: int | None = None, config: dict | None = None,
                 pdl: bool = False) -> torch.Tensor:
    """Triton version of `fused_linear_ref`: x [M, K], weight [N, K] contiguous, bias [N], ln (w [K], b [K], eps),
    residual [M, N], live [M] bool (with a residual: rows that are False get the residual unchanged); one dtype
    (fp16/bf16/fp32 on GPU; fp32/fp16 under TRITON_INTERPRET=1). fp32 accumulation, one rounding to the output
    dtype. With `skip` set on the device, every row is frozen: columns [0, skip_cols) (default all) are the
    residual, or unwritten without one. pdl: launch with programmatic dependent launch (see `kernels.launch`).
    Returns y [M, N]."""
    check_linear_args(x, weight, bias, residual, live)
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    cfg = dict(config or (interpreter_config(M, N, K) if interpreted() else tile_config(M, N)))
    if config is None and skip is not None and (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 32):
        cfg["num_warps"] = 8  # at 4 warps the skippable variant spills on sm_90a (bench/aot_compile.py)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    ln_w, ln_b, eps = ln if ln is not None else (bias, bias, 0.0)  # unused pointers without a layernorm
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _fused_linear[grid](x, weight, bias, ln_w, ln_b, residual if residual is not None else y,
                        live if live is not None else bias, skip if skip is not None else bias, y, M, N, K,
                        N if skip_cols is None else skip_cols, eps, HAS_LN=ln is not None, GELU=gelu,
                        HAS_RES=residual is not None, HAS_LIVE=live is not None, HAS_SKIP=skip is not None,
                        FP32_IEEE=x.dtype == torch.float32, USE_PDL=pdl, **cfg, **pdl_options(pdl))
    return y
