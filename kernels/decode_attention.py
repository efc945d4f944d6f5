"""Decode attention for one new position per row, straight from the fused c_attn output.

One program per (row, head): it stores the new key/value into the cache at the slot (read from the device, so
the kernel is graph-capturable), then attends with an online softmax (fp32) over the row's valid cached
positions before the slot, starting from the new key/value held in registers. It reads only the slots up to the
current one, not the whole cache bucket. With the `skip` flag set (early exit predicated inside one graph) it
stores the key/value (state propagation) and skips the attention; y is then left unwritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LAUNCHES = {"decode_attention": 0}  # counts wrapper calls, so tests can assert which path ran


@triton.jit
def _decode_attention(
    qkv_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, skip_ptr, y_ptr,
    H, T, D, scale,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    dd = tl.arange(0, HEAD_DIM)
    slot = tl.load(slot_ptr).to(tl.int32)
    row = qkv_ptr + b.to(tl.int64) * 3 * D + h * HEAD_DIM
    k_new = tl.load(row + D + dd)
    v_new = tl.load(row + 2 * D + dd)
    head = (b * H + h).to(tl.int64) * T * HEAD_DIM
    tl.store(k_ptr + head + slot * HEAD_DIM + dd, k_new)
    tl.store(v_ptr + head + slot * HEAD_DIM + dd, v_new)
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr).to(tl.int32) == 0
    if run:
        q = tl.load(row + dd).to(tl.float32)
        m = tl.sum(q * k_new.to(tl.float32), axis=0) * scale  # the new position first: m stays finite
        total = m * 0.0 + 1.0
        acc = v_new.to(tl.float32)
        for start in range(0, slot, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            ok = (t < slot) & (tl.load(valid_ptr + b.to(tl.int64) * T + t, mask=t < slot, other=0) != 0)
            offsets = head + t[:, None].to(tl.int64) * HEAD_DIM + dd[None, :]
            keys = tl.load(k_ptr + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
            scores = tl.where(ok, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            correction = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)
            values = tl.load(v_ptr + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
            total = total * correction + tl.sum(p, axis=0)
            acc = acc * correction + tl.sum(p[:, None] * values, axis=0)
            m = m_new
        out = y_ptr + b.to(tl.int64) * D + h * HEAD_DIM + dd
        tl.store(out, (acc / total).to(y_ptr.dtype.element_ty))


def decode_attention(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
                     slot: torch.Tensor, skip: torch.Tensor | None = None, block_t: int = 64) -> torch.Tensor:
    """Triton version of `decode_attention_ref`: qkv [B, 3d], cache_k / cache_v [B, H, T, hd] contiguous (written
    at `slot`), valid [B, T] bool, slot [1] int64, one float dtype; hd a power of two. Returns y [B, d]."""
    B, H, T, hd = cache_k.shape
    d = H * hd
    if qkv.shape != (B, 3 * d) or cache_v.shape != cache_k.shape or valid.shape != (B, T):
        raise ValueError(f"shapes do not match: qkv {tuple(qkv.shape)}, cache {tuple(cache_k.shape)}, "
                         f"valid {tuple(valid.shape)}")
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()) or hd & (hd - 1):
        raise ValueError(f"the cache must be contiguous with a power-of-two head size, got head size {hd}")
    qkv = qkv.contiguous()
    y = torch.empty(B, d, device=qkv.device, dtype=qkv.dtype)
    _decode_attention[(B, H)](qkv, cache_k, cache_v, valid, slot, skip if skip is not None else slot, y,
                              H, T, d, hd**-0.5, HEAD_DIM=hd, BLOCK_T=block_t, HAS_SKIP=skip is not None)
    LAUNCHES["decode_attention"] += 1
    return y
