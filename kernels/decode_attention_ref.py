"""Plain PyTorch reference of the decode attention (no triton import)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention_ref(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
                         slot: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One new position per row at cache slot `slot` ([1] int64): writes its key/value into the cache, marks the
    slot valid and attends over the valid slots (none after `slot`, as in decoding).

    qkv: [B, 3d] (q|k|v, heads in order), cache_k / cache_v: [B, H, T, hd] and valid: [B, T] bool (all written in
    place).
    scale: of the scores (default 1/sqrt(hd)). Returns y [B, d] (heads concatenated), in the input dtype."""
    B, H, T, hd = cache_k.shape
    q, k, v = (t.view(B, H, 1, hd) for t in qkv.split(H * hd, dim=-1))
    cache_k.index_copy_(2, slot, k)
    cache_v.index_copy_(2, slot, v)
    valid.index_fill_(1, slot, True)
    y = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=valid[:, None, None, :], scale=scale)
    return y.reshape(B, H * hd)
