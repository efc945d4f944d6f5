"""Plain PyTorch reference of the fused exit stage (no triton import: the runtime's CPU path uses it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExitHeadOutput:
    """Per exit e and row b. logits, logprobs: [E, B, V] fp32 (logprobs None unless asked for);
    lse, max_prob, margin (top-1 minus top-2 probability): [E, B] fp32; argmax: [E, B] int64
    (first index on ties); max_logit: [E, B] fp32 (the largest logit)."""

    logits: torch.Tensor
    lse: torch.Tensor
    max_prob: torch.Tensor
    margin: torch.Tensor
    argmax: torch.Tensor
    max_logit: torch.Tensor
    logprobs: torch.Tensor | None = None


def exit_head_ref(hidden: torch.Tensor | Sequence[torch.Tensor], ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                  eps: float, heads: list[torch.Tensor], with_logprobs: bool = False) -> ExitHeadOutput:
    """hidden: [E, B, d] or E tensors [B, d] (row e feeds head e), ln_*: [d], heads: E tensors [V, d]; all in one
    dtype.

    logits[e] = heads[e] @ layer_norm(hidden[e]); the layernorm and matmul run in the input dtype, the
    softmax statistics in fp32 (float64 for float64 input)."""
    if not isinstance(hidden, torch.Tensor):
        hidden = torch.stack(list(hidden))
    normed = F.layer_norm(hidden, (hidden.shape[-1],), ln_weight, ln_bias, eps)
    stats_dtype = torch.promote_types(hidden.dtype, torch.float32)  # float64 input stays float64
    logits = torch.stack([F.linear(normed[e], w) for e, w in enumerate(heads)]).to(stats_dtype)
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    top2 = probs.topk(2, dim=-1).values
    return ExitHeadOutput(
        logits=logits,
        lse=torch.logsumexp(logits, dim=-1),
        max_prob=top2[..., 0],
        margin=top2[..., 0] - top2[..., 1],
        argmax=logits.argmax(-1),
        max_logit=logits.max(-1).values,
        logprobs=logprobs if with_logprobs else None,
    )
