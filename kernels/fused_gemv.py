"""Loop-free decode linear for up to 8 rows: `fused_linear_ref` ([layernorm ->] x @ W.T + b [-> gelu]
[+ residual], frozen rows, a skip flag) on CUDA cores, for the batch-1 decode step.

Each program owns BLOCK_N whole output rows of the weight (stored [N, K], K contiguous) and loads all of them with
one `tl.load` (16-byte vectors, evict-first): no K loop, no tensor cores, no shared-memory staging; fp32 products
summed across the program's threads. Programs are small (about 8 KB of fp16 weights each) and many (c_attn at
gpt2-medium: 768), so several sit on each SM and megabytes of weights are requested at once: what a batch-1 step
needs to stream at memory bandwidth (the tiled `fused_linear` keeps 12-24 KB in flight per program and walks
dependent K steps; `../shared/notes/gpu-decode.md`). Layernorm statistics come from one load of each row, held in
registers (two-pass mean and variance, fp32); the normalized row is rounded to the weight dtype before the
products, as the torch path's layernorm output is.

Order inside a program (what `bench/aot_compile.py` checks in the PTX of the PDL variants): with `pdl`, first
`gdc_launch_dependents` (the next kernel may launch and issue its own weight loads), then every load of constants
(weight rows, bias, layernorm parameters), then `gdc_wait` (the previous kernel has finished and its writes are
visible), and only after it the activations, flags, residuals and every store. A skippable variant reads its flag
first and then only the weight rows it computes.

Frozen rows (`live`) and the skip flag (`skip`, `skip_cols`) mean what they mean in `fused_linear`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_linear import _tanh, check_linear_args
from .launch import interpreted, pdl_options

MAX_ROWS = 8  # rows held in one program's loop (unrolled); more rows: the tiled kernel or cuBLAS


@triton.jit
def _fused_gemv(
    x_ptr, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, res_ptr, live_ptr, skip_ptr, y_ptr,
    M, N, K, skip_cols, eps,
    HAS_LN: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_LIVE: tl.constexpr,
    HAS_SKIP: tl.constexpr, USE_PDL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    n_ok = n < N
    k_ok = k < K
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K + k[None, :]
    bias = tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    g = k_ok.to(tl.float32)
    beta = g
    if HAS_LN:
        g = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    w = tl.zeros([BLOCK_N, BLOCK_K], dtype=w_ptr.dtype.element_ty)
    if not HAS_SKIP:  # the whole slice, before the wait
        w = tl.load(w_rows, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    compute = pid >= 0
    frozen = pid < 0  # the skip flag freezes every row
    out_n = n_ok
    if HAS_SKIP:
        frozen = tl.load(skip_ptr).to(tl.int32) != 0
        first = tl.where(frozen, skip_cols, 0)  # first column to compute
        compute = (pid * BLOCK_N + BLOCK_N > first) & (first < N)  # a column in [first, N): a last tile may pass N
        out_n = n_ok & (n >= first)
        w = tl.load(w_rows, mask=out_n[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
    if compute:
        wf = w.to(tl.float32)
        for r in tl.static_range(ROWS):
            row_ok = tl.full([], r, tl.int32) < M  # a tensor even when M == 1 is specialized
            x = tl.load(x_ptr + r * K + k, mask=k_ok & (k * 0 + r < M), other=0.0).to(tl.float32)
            if HAS_LN:  # statistics of the row in registers: one load
                mean = tl.sum(x, axis=0) / K
                diff = tl.where(k_ok, x - mean, 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / K + eps)
                x = (diff * rstd * g + beta).to(w_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.sum(wf * x[None, :], axis=1) + bias
            if GELU:
                acc = 0.5 * acc * (1.0 + _tanh(0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)))
            ok = out_n & (n * 0 + r < M)
            if HAS_RES:
                residual = tl.load(res_ptr + r * N + n, mask=ok, other=0.0).to(tl.float32)
                live = row_ok & (frozen == 0)
                if HAS_LIVE:
                    live = live & (tl.load(live_ptr + r, mask=row_ok, other=0).to(tl.int32) != 0)
                acc = tl.where(live, acc + residual, residual)  # frozen rows pass their input through
            tl.store(y_ptr + r * N + n, acc.to(y_ptr.dtype.element_ty), mask=ok)
    elif HAS_RES:  # a skipped tile of a residual kernel: every row is frozen
        for r in tl.static_range(ROWS):
            ok = n_ok & (n * 0 + r < M)
            tl.store(y_ptr + r * N + n, tl.load(res_ptr + r * N + n, mask=ok), mask=ok)


def gemv_config(rows: int, cols: int, k: int) -> dict:
    """Launch settings: the whole K in one tile (a power of two, masked), output rows per program such that a
    program's weight slice is about 4096 elements (8 KB fp16; 2048 above 2 rows, whose unrolled rows hold more
    registers: spill-free in bf16 too) and the grid has at least 512 programs where N allows (several per SM on a
    132-SM card); 4 warps (a 1024-wide fp16 row is one 16-byte load per thread of 128), 8 up to 2048-wide rows and
    16 beyond (fewer registers per thread: 4096-wide rows spilled at 8 warps under triton 3.6), never fewer than 8
    elements per thread; 2 warps for more than 2 rows of width <= 1024 (their 2048-element slices spilled 16 bytes
    at 4 warps on sm_90a under triton 3.9, and 8-88 bytes at 8 warps on sm_80; at 2 warps none, under 3.6 and
    3.9). Registers, spills and programs per SM: `bench/aot_compile.py`; throughput: the perf stage of gpu_check."""
    block_k = triton.next_power_of_2(k)
    block_n = max(1, (4096 if rows <= 2 else 2048) // block_k)
    while block_n > 1 and triton.cdiv(cols, block_n) < 512:
        block_n //= 2
    warps = 2 if block_k <= 1024 and rows > 2 else 4 if block_k <= 1024 else 8 if block_k <= 2048 else 16
    warps = min(warps, max(1, block_n * block_k // 256))
    return dict(ROWS=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=1)


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               ln: tuple[torch.Tensor, torch.Tensor, float] | None = None, gelu: bool = False,
               residual: torch.Tensor | None = None, live: torch.Tensor | None = None, skip: torch.Tensor | None = None,
               skip_cols: int | None = None, config: dict | None = None, pdl: bool = False) -> torch.Tensor:
    """Triton version of `fused_linear_ref` for M <= 8 rows, with `fused_linear`'s arguments: x [M, K],
    weight [N, K] contiguous, bias [N], ln (w [K], b [K], eps), residual [M, N], live [M] bool, skip [1] int32 on
    the device (columns below skip_cols, default all, not computed: the residual, or unwritten without one); one
    dtype (fp16/bf16/fp32 on GPU; fp32/fp16 under TRITON_INTERPRET=1). fp32 accumulation, one rounding to the
    output dtype. Returns y [M, N]. Raises ValueError for more than 8 rows or mismatched shapes / dtypes."""
    check_linear_args(x, weight, bias, residual, live)
    M, K = x.shape
    if M > MAX_ROWS:
        raise ValueError(f"fused_gemv takes at most {MAX_ROWS} rows, got {M}")
    N = weight.shape[0]
    cfg = dict(config or gemv_config(M, N, K))
    if config is None and interpreted():  # programs run one after another: few, wide ones
        cfg["BLOCK_N"] = min(64, triton.next_power_of_2(N))
    if cfg["ROWS"] < M or cfg["BLOCK_K"] < K:
        raise ValueError(f"config ROWS {cfg['ROWS']} / BLOCK_K {cfg['BLOCK_K']} cannot hold {M} rows of {K}: the "
                         "kernel has no row or K loop")
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    ln_w, ln_b, eps = ln if ln is not None else (bias, bias, 0.0)  # unused pointers without a layernorm
    _fused_gemv[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        x, weight, bias, ln_w, ln_b, residual if residual is not None else y, live if live is not None else bias,
        skip if skip is not None else bias, y, M, N, K, N if skip_cols is None else skip_cols, eps,
        HAS_LN=ln is not None, GELU=gelu, HAS_RES=residual is not None, HAS_LIVE=live is not None,
        HAS_SKIP=skip is not None, USE_PDL=pdl, **cfg, **pdl_options(pdl))
    return y
