"""Fused decode linear: [layernorm ->] x @ W + b [-> gelu] [+ residual], with an optional skip flag.

One kernel per GPT-2 block matmul at decode time (few rows, memory-bound): the layernorm is a prologue (each
program normalizes its rows with fp32 statistics), bias, tanh-gelu and the residual add are an epilogue, so a
block is 4 of these plus attention instead of ~12 separate kernels. Grid = column tiles x row blocks; each
program reads its [K, BLOCK_N] slice of the weight once, fp32 accumulation.

`skip` ([1] int32/bool on the device) is device-side predication for early exit inside one CUDA graph: when
it is nonzero, columns [0, skip_cols) are not computed (programs whose tile lies there return before reading
any weight) and their outputs keep whatever they held. A block whose rows have all exited then reads only the
key/value columns of c_attn (state propagation) and nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import ln_matmul

LAUNCHES = {"fused_linear": 0}  # counts wrapper calls, so tests can assert which path ran


@triton.jit
def _tanh(u):
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # no libdevice under the interpreter; saturates to +-1


@triton.jit
def _fused_linear(
    x_ptr, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, res_ptr, skip_ptr, y_ptr,
    M, N, K, skip_cols, eps,
    HAS_LN: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_SKIP: tl.constexpr,
    FP32_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    run = True
    if HAS_SKIP:
        first_col = tl.where(tl.load(skip_ptr).to(tl.int32) != 0, skip_cols, 0)  # first column to compute
        run = pid_n * BLOCK_N + BLOCK_N > first_col
        col_ok = col_ok & (cols >= first_col)
    if run:
        acc = ln_matmul(x_ptr + rows.to(tl.int64)[:, None] * K, row_ok, w_ptr, N, cols, col_ok, ln_w_ptr, ln_b_ptr,
                        K, eps, HAS_LN, FP32_IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + _tanh(0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)))
        out_ok = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        if HAS_RES:
            acc += tl.load(res_ptr + offsets, mask=out_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offsets, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def tile_config(rows: int, cols: int) -> dict:
    """Block sizes per row and column count: decode batches fit one row block (tl.dot needs >= 16 rows); narrow
    column tiles give enough programs to stream the weight at full bandwidth (c_proj has only 1024 columns:
    64 programs of 16). Untuned: bench/bench_fused_linear.py --sweep measures the alternatives."""
    block_n = 16 if cols <= 1024 else 32
    if rows <= 16:
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows <= 32:
        return dict(BLOCK_M=32, BLOCK_N=block_n, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3)  # 4 warps spill (triton 3.6)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 ln: tuple[torch.Tensor, torch.Tensor, float] | None = None, gelu: bool = False,
                 residual: torch.Tensor | None = None, skip: torch.Tensor | None = None, skip_cols: int | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """Triton version of `fused_linear_ref`: x [M, K], weight [K, N] contiguous, bias [N], ln (w [K], b [K], eps),
    residual [M, N]; one dtype (fp16/bf16/fp32 on GPU; fp32/fp16 under TRITON_INTERPRET=1). fp32 accumulation,
    one rounding to the output dtype. With `skip` set on the device, columns [0, skip_cols) (default all) are
    left unwritten. Returns y [M, N]."""
    M, K = x.shape
    N = weight.shape[1]
    if weight.shape != (K, N) or not weight.is_contiguous() or bias.shape != (N,):
        raise ValueError(f"weight must be contiguous [{K}, N] with bias [N], got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    if residual is not None and residual.shape != (M, N):
        raise ValueError(f"residual must be [{M}, {N}], got {tuple(residual.shape)}")
    if len({t.dtype for t in (x, weight, bias) + (() if residual is None else (residual,))}) != 1:
        raise ValueError("x, weight, bias and residual must share one dtype")
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    cfg = dict(config or tile_config(M, N))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    ln_w, ln_b, eps = ln if ln is not None else (bias, bias, 0.0)  # unused pointers without a layernorm
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    _fused_linear[grid](x, weight, bias, ln_w, ln_b, residual if residual is not None else y,
                        skip if skip is not None else bias, y, M, N, K, N if skip_cols is None else skip_cols, eps,
                        HAS_LN=ln is not None, GELU=gelu, HAS_RES=residual is not None, HAS_SKIP=skip is not None,
                        FP32_IEEE=x.dtype == torch.float32, **cfg)
    LAUNCHES["fused_linear"] += 1
    return y
