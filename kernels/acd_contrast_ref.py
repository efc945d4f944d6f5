"""Plain PyTorch reference of Autocontrastive Decoding's contrast (Gera et al. 2023, as autocontrastive-gen
computes it)."""

from __future__ import annotations

import torch


def acd_contrast_ref(logits_upper: torch.Tensor, logits_lower: torch.Tensor, alpha: float = 0.1,
                     min_candidates: int = 1) -> torch.Tensor:
    """[B, V] logits of the upper and lower exit -> [B, V] log q in fp32 (float64 for float64 input).

    thr = min(alpha * max p_u, k-th largest p_u); S = {v: p_u[v] >= thr};
    q = softmax_S(log p_u - log p_l) * sum_S p_u on S, q = p_u off S."""
    dtype = torch.promote_types(logits_upper.dtype, torch.float32)
    lp_u = torch.log_softmax(logits_upper.to(dtype), dim=-1)
    lp_l = torch.log_softmax(logits_lower.to(dtype), dim=-1)
    p_u = lp_u.exp()
    top = p_u.topk(min_candidates, dim=-1).values
    thr = torch.minimum(alpha * top[..., :1], top[..., -1:])
    plausible = p_u >= thr
    contrast = torch.where(plausible, lp_u - lp_l, float("-inf"))
    mass = torch.where(plausible, p_u, 0.0).sum(-1, keepdim=True)
    return torch.where(plausible, torch.log_softmax(contrast, dim=-1) + mass.log(), lp_u)
