"""Plain PyTorch reference of state propagation into the KV cache (no triton import)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def propagate_kv_ref(h: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, attn_w: torch.Tensor,
                     attn_b: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, rows: torch.Tensor,
                     slots: torch.Tensor, start: int, end: int, eps: float) -> None:
    """Keys/values of blocks start..end-1 for positions (rows[i], slots[i]) from the exited states h [N, d]:
    K_j, V_j = c_attn_j(ln_1_j(h))[k, v], written into cache_k / cache_v [L, B, H, T, hd] in place.

    ln_w, ln_b: [L, d]; attn_w: [L, 3d, d] (nn.Linear's layout), attn_b: [L, 3d]; rows, slots: [N] int64. One
    batched matmul over the blocks' k|v rows (2·d² of each block's 12·d² weights), in the input dtype."""
    L, B, H, T, hd = cache_k.shape
    d = H * hd
    normed = F.layer_norm(h, (d,), eps=eps)
    a = normed[None] * ln_w[start:end, None, :] + ln_b[start:end, None, :]  # [J, N, d]
    kv = torch.baddbmm(attn_b[start:end, None, d:], a, attn_w[start:end, d:].transpose(1, 2))  # [J, N, 2d]
    k, v = kv.view(end - start, -1, 2, H, hd).unbind(2)  # [J, N, H, hd]
    index = (torch.arange(start, end, device=h.device)[:, None], rows[None], slots[None])
    cache_k.permute(0, 1, 3, 2, 4)[index] = k  # a [L, B, T, H, hd] view: the three indices are adjacent
    cache_v.permute(0, 1, 3, 2, 4)[index] = v
