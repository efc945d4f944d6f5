"""Plain PyTorch reference of the non-finite state check (no triton import): each token's new state marks its
cache slot when any of its values is NaN or infinite, so a generation can say which row and step overflowed without
a host read per step."""

from __future__ import annotations

import torch


def check_states_ref(h: torch.Tensor, health: torch.Tensor, valid: torch.Tensor, slot,
                     rows: torch.Tensor | None = None) -> None:
    """h [b, S, d]: the states just computed for the tokens at cache slots slot..slot+S-1 (`slot` an int or a [1]
    int64 tensor) of cache rows `rows` ([b] int64; None: rows 0..b-1). health [B, T] fp32 (zeros at the start),
    valid [B, T] bool: the cache's. For each token at a valid slot, adds the fp32 sum of 0 * its state to
    health[row, slot]: the entry stays 0 while every state of that token is finite and turns NaN for good once one
    is not (0 * inf and 0 * NaN are NaN). Padding (invalid slots) is not checked."""
    b, s, _ = h.shape
    if isinstance(slot, torch.Tensor):
        slots = slot if s == 1 else slot + torch.arange(s, device=h.device)
    else:  # no host-to-device copy (it would wait for the device)
        slots = torch.arange(slot, slot + s, device=h.device)
    rows = torch.arange(b, device=h.device) if rows is None else rows
    index = (rows[:, None].expand(b, s), slots[None, :].expand(b, s))
    marks = (h.float() * 0.0).sum(-1)  # 0, or NaN where the state is not finite (0 * inf is NaN; never overflows)
    health.index_put_(index, marks.masked_fill_(~valid[index], 0.0), accumulate=True)
