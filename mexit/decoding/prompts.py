"""A batch of prompts as the decoder takes it: validated token ids, left-padded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mexit.values import plain

if TYPE_CHECKING:
    from mexit.model.config import ModelConfig


@dataclass
class PaddedBatch:
    """Left-padded prompts. ids, positions: [B, P] int64; valid: [B, P] bool (False on padding)."""

    ids: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


def check_prompts(prompts, config: ModelConfig, max_new_tokens: int | None) -> list[list[int]]:
    """Validate token-id prompts: a non-empty batch of non-empty rows of ids in the vocabulary, fitting the
    context together with max_new_tokens (None: the prompts alone, as a forward pass reads them); numpy / torch
    ids and counts as plain ones. Returns them as lists of ints."""
    prompts, max_new_tokens = plain(prompts), plain(max_new_tokens)
    if isinstance(prompts, (int, float)) and not isinstance(prompts, bool):
        raise ValueError(f"prompts must be token ids in a list or an array, got the single number {prompts!r}")
    if not prompts:
        raise ValueError("no prompts were given")
    if isinstance(prompts[0], (int, float)):
        prompts = [prompts]
    if any(not isinstance(row, (list, tuple)) for row in prompts) or any(
            isinstance(t, (list, tuple)) for row in prompts for t in row):
        raise ValueError("token-id prompts are a list of ids or a list of rows of ids (a 1-d or 2-d array); got "
                         "rows that mix ids with lists, or a deeper nesting")
    if any(isinstance(t, bool) or not isinstance(t, int) and not (isinstance(t, float) and t.is_integer())
           for row in prompts for t in row):
        raise ValueError("token ids must be integers")
    prompts = [list(map(int, row)) for row in prompts]
    empty = [i for i, row in enumerate(prompts) if not row]
    if empty:
        raise ValueError(f"empty prompt{_row(empty[0], prompts)}: every row needs at least one token")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, float))
                                       or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for i, row in enumerate(prompts):
        bad = sorted({t for t in row if not 0 <= t < config.vocab_size})
        if bad:
            raise ValueError(f"token ids {bad[:10]} are outside the vocabulary 0..{config.vocab_size - 1}"
                             f"{_row(i, prompts)}")
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    n = len(prompts[longest])
    which = f"the prompt ({n} tokens)" if len(prompts) == 1 else f"the longest prompt (row {longest}, {n} tokens)"
    if max_new_tokens is None and n > config.n_positions:
        raise ValueError(f"{which} exceeds the context of the model ({config.n_positions} positions)")
    if max_new_tokens is not None and n + max_new_tokens > config.n_positions:
        raise ValueError(f"{which} plus max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                         f"{config.n_positions} positions")
    return prompts


def _row(i: int, prompts: list) -> str:
    """' (row i)' where the batch has several rows, else ''."""
    return f" (row {i})" if len(prompts) > 1 else ""


def left_pad(prompts: list[list[int]], device) -> PaddedBatch:
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for b, row in enumerate(prompts):
        ids[b, longest - len(row):] = torch.tensor(row)
        valid[b, longest - len(row):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), positions.to(device), valid.to(device))
