"""Triton device functions several kernels share: a layernorm prologue over row tiles and the layernorm-then-
matmul loop over a weight stored [N, K] (nn.Linear's layout, K contiguous). fp32 statistics and accumulation."""

from __future__ import annotations

import triton
import triton.language as tl

ONE_LOAD_MAX = 16384  # rows x padded width a kernel may read at once for statistics (64 fp32 per thread at 8 warps)


def one_load_width(rows: int, k: int) -> int:
    """The ROW_WIDTH a kernel passes to `row_stats` for BLOCK_M = rows and width k: k rounded up to a power of two
    where rows x that fit ONE_LOAD_MAX (one load), else 0 (steps)."""
    width = triton.next_power_of_2(k)
    return width if rows * width <= ONE_LOAD_MAX else 0


@triton.jit
def row_stats(x_rows, row_ok, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROW_WIDTH: tl.constexpr):
    """Mean and 1/std ([BLOCK_M] fp32) of the rows x_rows[:, 0:K] (x_rows: [BLOCK_M, 1] row pointers), two passes
    (mean, then squared deviations). ROW_WIDTH (K rounded up to a power of two, `one_load_width`): the rows come
    from one load held in registers (one memory round trip); 0: in BLOCK_K steps (2 x K / BLOCK_K dependent
    loads, the tiled fused-linear kernel's way: fewer registers)."""
    if ROW_WIDTH > 0:
        kk = tl.arange(0, ROW_WIDTH)
        m = row_ok[:, None] & (kk < K)[None, :]
        x = tl.load(x_rows + kk[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / K
        diff = tl.where(m, x - mean[:, None], 0.0)
        squares = tl.sum(diff * diff, axis=1)
    else:
        kk = tl.arange(0, BLOCK_K)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            m = row_ok[:, None] & ((k + kk) < K)[None, :]
            total += tl.sum(tl.load(x_rows + k + kk[None, :], mask=m, other=0.0).to(tl.float32), axis=1)
        mean = total / K
        squares = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            m = row_ok[:, None] & ((k + kk) < K)[None, :]
            diff = tl.where(m, tl.load(x_rows + k + kk[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None],
                            0.0)
            squares += tl.sum(diff * diff, axis=1)
    return mean, 1.0 / tl.sqrt(squares / K + eps)


@triton.jit
def normalized_tile(x_rows, row_ok, k, K, mean, rstd, ln_w_ptr, ln_b_ptr, BLOCK_K: tl.constexpr):
    """Columns k..k+BLOCK_K of the layernormed rows, [BLOCK_M, BLOCK_K] fp32 (0 outside the rows / K)."""
    kk = tl.arange(0, BLOCK_K)
    k_ok = (k + kk) < K
    m = row_ok[:, None] & k_ok[None, :]
    x = tl.load(x_rows + k + kk[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(ln_w_ptr + k + kk, mask=k_ok, other=0.0).to(tl.float32)
    b = tl.load(ln_b_ptr + k + kk, mask=k_ok, other=0.0).to(tl.float32)
    return tl.where(m, (x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :], 0.0)


@triton.jit
def weight_tile(w_ptr, w_stride, k, K, cols, col_ok, BLOCK_K: tl.constexpr):
    """Inputs k..k+BLOCK_K of the outputs `cols` of a weight stored [N, K] (rows w_stride apart), as the
    [BLOCK_K, BLOCK_N] operand of x @ W.T (0 outside K / the columns)."""
    kk = tl.arange(0, BLOCK_K)
    k_ok = (k + kk) < K
    return tl.trans(tl.load(w_ptr + cols.to(tl.int64)[:, None] * w_stride + (k + kk)[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0))


@triton.jit
def dot_acc(x, w, acc, FP32_IEEE: tl.constexpr):
    """acc + x @ w with fp32 accumulation; fp32 inputs as full-precision products (not tf32)."""
    if FP32_IEEE:
        acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    else:
        acc = tl.dot(x.to(w.dtype), w, acc)
    return acc


@triton.jit
def ln_matmul(x_rows, row_ok, w_ptr, w_stride, cols, col_ok, ln_w_ptr, ln_b_ptr, K, eps, w_first,
              HAS_LN: tl.constexpr, FP32_IEEE: tl.constexpr, HAS_FIRST: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_WIDTH: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32: layernorm(x) (or x) times the weight's outputs `cols` (stored [N, K], rows
    w_stride apart).
    HAS_FIRST: w_first is the weight's first tile (`weight_tile` at k = 0), loaded earlier (before a PDL wait).
    ROW_WIDTH: `row_stats`'s."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_LN:
        mean, rstd = row_stats(x_rows, row_ok, K, eps, BLOCK_M, BLOCK_K, ROW_WIDTH)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    start = 0
    if HAS_FIRST:
        acc = dot_acc(_x_tile(x_rows, row_ok, 0, K, mean, rstd, ln_w_ptr, ln_b_ptr, HAS_LN, BLOCK_K), w_first, acc,
                      FP32_IEEE)
        start = BLOCK_K
    for k in range(start, K, BLOCK_K):
        xk = _x_tile(x_rows, row_ok, k, K, mean, rstd, ln_w_ptr, ln_b_ptr, HAS_LN, BLOCK_K)
        acc = dot_acc(xk, weight_tile(w_ptr, w_stride, k, K, cols, col_ok, BLOCK_K), acc, FP32_IEEE)
    return acc


@triton.jit
def _x_tile(x_rows, row_ok, k, K, mean, rstd, ln_w_ptr, ln_b_ptr, HAS_LN: tl.constexpr, BLOCK_K: tl.constexpr):
    if HAS_LN:  # fp32
        x = normalized_tile(x_rows, row_ok, k, K, mean, rstd, ln_w_ptr, ln_b_ptr, BLOCK_K)
    else:  # the input dtype
        kk = tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k + kk[None, :], mask=row_ok[:, None] & ((k + kk) < K)[None, :], other=0.0)
    return x
