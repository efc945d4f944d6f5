"""Plain PyTorch reference of the fused decode linear (no triton import: the runtime's torch path uses it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     ln: tuple[torch.Tensor, torch.Tensor, float] | None = None, gelu: bool = False,
                     residual: torch.Tensor | None = None, live: torch.Tensor | None = None) -> torch.Tensor:
    """y = residual + gelu_tanh(layer_norm(x) @ weight + bias), each of layernorm / gelu / residual optional;
    rows where `live` is False (frozen: exited) are the residual unchanged.

    x: [M, K], weight: [N, K] (nn.Linear's layout), bias: [N], ln: (weight [K], bias [K], eps),
    residual: [M, N], live: [M] bool (with a residual); one dtype. Every op runs in the input dtype, as the
    model's torch path does."""
    a = F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], ln[2]) if ln is not None else x
    y = F.linear(a, weight, bias)
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if residual is None:
        return y
    y = residual + y
    return y if live is None else torch.where(live[:, None], y, residual)
