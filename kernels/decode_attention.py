"""Decode attention for one new position per row, straight from the fused c_attn output.

Programs per (row, head, split): the new key/value is stored into the cache at the slot (read from the device,
so the kernel is graph-capturable); each program then attends with an online softmax (fp32) over the row's
valid cached positions in its split of [0, slot), split 0 starting from the new key/value held in registers.
Only the slots up to the current one are read, not the whole cache bucket. With one split (short caches, or
enough rows x heads to fill the GPU) the program writes y itself: one launch. Long caches at small batch are
split (flash-decoding) so that enough programs stream the cache, and a small merge kernel combines the splits'
(max, sum, weighted values). With the `skip` flag set (early exit predicated inside one graph) only the key/value
is stored (state propagation) and y is left unwritten. The kernel also marks the slot valid for the row, so the
step needs no torch operation for it. With `pdl` it waits on the kernel before it (its input) first thing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import interpreted, pdl_options

SPLIT_FROM = 512  # caches shorter than this are never split
SPLIT_SLOTS = 128  # a split covers at least this many slots


@triton.jit
def _decode_attention(
    qkv_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, skip_ptr, y_ptr, part_ptr,
    H, T, D, chunk, scale,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, HAS_SKIP: tl.constexpr, SPLIT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # first let the next kernel launch (its reads wait for this kernel's end), then wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    dd = tl.arange(0, HEAD_DIM)
    slot = tl.load(slot_ptr).to(tl.int32)
    row = qkv_ptr + b.to(tl.int64) * 3 * D + h * HEAD_DIM
    q = tl.load(row + dd).to(tl.float32)  # q, k, v issued together, before the slot-dependent stores
    k_new = tl.load(row + D + dd)
    v_new = tl.load(row + 2 * D + dd)
    head = (b * H + h).to(tl.int64) * T * HEAD_DIM
    first = dd < tl.where(s == 0, HEAD_DIM, 0)  # split 0 stores the new key/value (and starts from it)
    tl.store(k_ptr + head + slot * HEAD_DIM + dd, k_new, mask=first)
    tl.store(v_ptr + head + slot * HEAD_DIM + dd, v_new, mask=first)
    tl.store(valid_ptr + b.to(tl.int64) * T + slot, 1, mask=(h == 0) & (s == 0))
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr).to(tl.int32) == 0
    if run:
        # split 0 starts from the new position (so its max is finite); the others from an empty softmax
        m = tl.where(s == 0, tl.sum(q * k_new.to(tl.float32), axis=0) * scale, -1.0e30)
        total = tl.where(s == 0, 1.0, 0.0)
        acc = tl.where(first, v_new.to(tl.float32), 0.0)
        lo = s * chunk
        hi = tl.minimum(lo + chunk, slot)
        for start in range(lo, hi, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            in_range = t < hi
            offsets = head + t[:, None].to(tl.int64) * HEAD_DIM + dd[None, :]
            # the valid flags, keys and values are independent loads (keys are not masked by the flags: no
            # flag -> key round trip); a slot that is not valid (left padding: anything, NaN included) is
            # masked in the scores and its values zeroed
            ok = in_range & (tl.load(valid_ptr + b.to(tl.int64) * T + t, mask=in_range, other=0) != 0)
            keys = tl.load(k_ptr + offsets, mask=in_range[:, None], other=0.0).to(tl.float32)
            values = tl.load(v_ptr + offsets, mask=in_range[:, None], other=0.0).to(tl.float32)
            scores = tl.where(ok, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            correction = tl.exp(m - m_new)
            p = tl.exp(scores - m_new)
            values = tl.where(ok[:, None], values, 0.0)
            total = total * correction + tl.sum(p, axis=0)
            acc = acc * correction + tl.sum(p[:, None] * values, axis=0)
            m = m_new
        if SPLIT:  # partials [B, H, splits, HEAD_DIM + 2]: weighted values, max, sum
            part = part_ptr + ((b * H + h) * tl.num_programs(2) + s).to(tl.int64) * (HEAD_DIM + 2)
            tl.store(part + dd, acc)
            tl.store(part + HEAD_DIM, m)
            tl.store(part + HEAD_DIM + 1, total)
        else:
            tl.store(y_ptr + b.to(tl.int64) * D + h * HEAD_DIM + dd, (acc / total).to(y_ptr.dtype.element_ty))


@triton.jit
def _decode_attention_merge(
    part_ptr, skip_ptr, y_ptr, H, D, splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SKIP: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # first let the next kernel launch (its reads wait for this kernel's end), then wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr).to(tl.int32) == 0
    if run:
        ss = tl.arange(0, BLOCK_S)
        dd = tl.arange(0, HEAD_DIM)
        s_ok = ss < splits
        part = part_ptr + ((b * H + h) * splits + ss).to(tl.int64) * (HEAD_DIM + 2)
        m = tl.load(part + HEAD_DIM, mask=s_ok, other=-1.0e30)
        total = tl.load(part + HEAD_DIM + 1, mask=s_ok, other=0.0)
        acc = tl.load(part[:, None] + dd[None, :], mask=s_ok[:, None], other=0.0)
        weight = tl.exp(m - tl.max(m, axis=0))
        y = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
        tl.store(y_ptr + b.to(tl.int64) * D + h * HEAD_DIM + dd, y.to(y_ptr.dtype.element_ty))


def choose_splits(batch: int, heads: int, length: int, device: torch.device) -> int:
    """1 unless the cache is long and rows x heads leave most of the GPU idle; then enough splits of at least
    SPLIT_SLOTS slots for about two programs per multiprocessor."""
    if length < SPLIT_FROM:
        return 1
    return max(1, min(length // SPLIT_SLOTS, -(-2 * multiprocessors(device) // (batch * heads))))


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (asked once per device: every block's attention call needs it); 132, an
    H100's, off a GPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def decode_attention(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
                     slot: torch.Tensor, skip: torch.Tensor | None = None, splits: int | None = None,
                     block_t: int | None = None, scale: float | None = None, pdl: bool = False) -> torch.Tensor:
    """Triton version of `decode_attention_ref`: qkv [B, 3d], cache_k / cache_v [B, H, T, hd] contiguous (written
    at `slot`), valid [B, T] bool (slot marked), slot [1] int64, one float dtype; hd a power of two. splits: how
    many programs share a row's cache (default `choose_splits`); block_t: slots per loop step (default 128, 64 with
    splits, 256 under the interpreter); scale: of the scores (default 1/sqrt(hd)); pdl: launch with programmatic
    dependent launch (`kernels.launch`). Returns y [B, d]."""
    B, H, T, hd = cache_k.shape
    d = H * hd
    if qkv.shape != (B, 3 * d) or cache_v.shape != cache_k.shape or valid.shape != (B, T):
        raise ValueError(f"shapes do not match: qkv {tuple(qkv.shape)}, cache {tuple(cache_k.shape)}, "
                         f"valid {tuple(valid.shape)}")
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()) or hd & (hd - 1):
        raise ValueError(f"the cache must be contiguous with a power-of-two head size, got head size {hd}")
    splits = splits or choose_splits(B, H, T, qkv.device)
    # slots per loop step: 160 cached slots in 2 steps; a split cache 64 (128 spills on sm_80 under triton 3.6)
    block_t = block_t or (256 if interpreted() else 128 if splits == 1 else 64)
    chunk = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, chunk)
    qkv = qkv.contiguous()
    y = torch.empty(B, d, device=qkv.device, dtype=qkv.dtype)
    part = torch.empty(B, H, splits, hd + 2, device=qkv.device, dtype=torch.float32) if splits > 1 else y
    skip_arg = skip if skip is not None else slot
    scale = hd**-0.5 if scale is None else scale
    _decode_attention[(B, H, splits)](qkv, cache_k, cache_v, valid, slot, skip_arg, y, part, H, T, d, chunk,
                                      scale, HEAD_DIM=hd, BLOCK_T=block_t, HAS_SKIP=skip is not None,
                                      SPLIT=splits > 1, USE_PDL=pdl, **pdl_options(pdl))
    if splits > 1:
        _decode_attention_merge[(B, H)](part, skip_arg, y, H, d, splits, HEAD_DIM=hd,
                                        BLOCK_S=triton.next_power_of_2(splits), HAS_SKIP=skip is not None,
                                        USE_PDL=pdl, **pdl_options(pdl))
    return y
