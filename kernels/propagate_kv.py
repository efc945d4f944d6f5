"""State propagation as one kernel: keys/values of many skipped blocks for exited positions, into the cache.

Grid = key|value column tiles x skipped blocks x row blocks. Each program normalizes its exited states with
block j's ln_1 (fp32 statistics), multiplies by BLOCK_N of block j's c_attn key/value output rows (stored [3d, d])
(fp32 accumulation), adds the bias and stores the tile straight into the cache at each row's (row, slot): one
launch for all skipped blocks, reading 2·d² weights per block (the torch path: a batched matmul and indexed
writes, several launches). With `pdl`, a program loads its first weight tile before waiting on the kernel before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreted, pdl_options
from .tiles import ln_matmul, one_load_width, weight_tile


@triton.jit
def _propagate_kv(
    h_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, k_ptr, v_ptr, rows_ptr, slots_ptr,
    N, D, B, H, T, start, eps,
    HEAD_DIM: tl.constexpr, FP32_IEEE: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_WIDTH: tl.constexpr,
):
    pid_n = tl.program_id(0)
    j = start + tl.program_id(1)
    m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < N
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # in [0, 2d): keys, then values
    col_ok = cols < 2 * D
    layer = j.to(tl.int64)
    w_layer = w_ptr + layer * D * 3 * D + D * D  # block j's c_attn [3d, d], from its key rows on
    w_first = col_ok
    if USE_PDL:  # first let the next kernel launch (its reads wait for this kernel's end), then wait
        tl.extra.cuda.gdc_launch_dependents()
        w_first = weight_tile(w_layer, D, 0, D, cols, col_ok, BLOCK_K)
        tl.extra.cuda.gdc_wait()
    acc = ln_matmul(h_ptr + m.to(tl.int64)[:, None] * D, m_ok, w_layer, D, cols, col_ok, ln_w_ptr + layer * D,
                    ln_b_ptr + layer * D, D, eps, w_first, True, FP32_IEEE, USE_PDL, BLOCK_M, BLOCK_N, BLOCK_K,
                    ROW_WIDTH)
    acc += tl.load(b_ptr + layer * 3 * D + D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    row = tl.load(rows_ptr + m, mask=m_ok, other=0)
    slot = tl.load(slots_ptr + m, mask=m_ok, other=0)
    kv_col = cols % D
    head = kv_col // HEAD_DIM
    offsets = (((layer * B + row[:, None]) * H + head[None, :]) * T + slot[:, None]) * HEAD_DIM \
        + (kv_col % HEAD_DIM)[None, :]
    out = acc.to(k_ptr.dtype.element_ty)
    ok = m_ok[:, None] & col_ok[None, :]
    tl.store(k_ptr + offsets, out, mask=ok & (cols < D)[None, :])
    tl.store(v_ptr + offsets, out, mask=ok & (cols >= D)[None, :])


def propagate_kv(h: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, attn_w: torch.Tensor,
                 attn_b: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor, start: int, end: int, eps: float, pdl: bool = False) -> None:
    """Triton version of `propagate_kv_ref` (same arguments, all contiguous, one float dtype; head size a power
    of two). pdl: launch with programmatic dependent launch (`kernels.launch`)."""
    L, B, H, T, hd = cache_k.shape
    D = H * hd
    N = h.shape[0]
    if attn_w.shape != (L, 3 * D, D) or h.shape != (N, D) or rows.shape != (N,) or slots.shape != (N,):
        raise ValueError(f"shapes do not match: h {tuple(h.shape)}, attn_w {tuple(attn_w.shape)}, cache "
                         f"{tuple(cache_k.shape)}, rows {tuple(rows.shape)}, slots {tuple(slots.shape)}")
    if not all(t.is_contiguous() for t in (ln_w, ln_b, attn_w, attn_b, cache_k, cache_v)) or hd & (hd - 1):
        raise ValueError("weights and cache must be contiguous, with a power-of-two head size")
    if start >= end or N == 0:
        return
    h, rows, slots = h.contiguous(), rows.contiguous(), slots.contiguous()
    block_m = 16 if N <= 16 else 64
    block_n = block_k = 64
    if interpreted():  # few, large tiles
        block_m, block_n, block_k = (max(16, triton.next_power_of_2(N)), min(256, triton.next_power_of_2(2 * D)),
                                       min(256, triton.next_power_of_2(D)))
    grid = (triton.cdiv(2 * D, block_n), end - start, triton.cdiv(N, block_m))
    _propagate_kv[grid](h, ln_w, ln_b, attn_w, attn_b, cache_k, cache_v, rows, slots, N, D, B, H, T, start, eps,
                        HEAD_DIM=hd, FP32_IEEE=h.dtype == torch.float32, USE_PDL=pdl, BLOCK_M=block_m,
                        BLOCK_N=block_n, BLOCK_K=block_k, ROW_WIDTH=one_load_width(block_m, D),
                        num_warps=8,  # 4 warps: 255 registers with the one-load statistics, spills with PDL
                        **pdl_options(pdl))
