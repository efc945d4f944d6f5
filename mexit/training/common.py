"""What the training commands share: text cut into token blocks, the learning-rate schedule, Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import torch

LOGITS_PER_CHUNK = 2**25  # fp32 logits alive at once per head (128 MB)


class TrainingInterrupted(Exception):
    """Ctrl-C during training: the state was saved; the message says how to resume."""


def token_blocks(tokenizer, paths: list[str], seq_len: int) -> torch.Tensor:
    """Texts joined by eos (as autocontrastive-gen's grouped texts), cut into [N, seq_len] int64 blocks."""
    eos = tokenizer.eos_token_id
    tokenizer.model_max_length = 2**62  # whole files: cut into blocks here, not truncated (and no length warning)
    ids: list[int] = []
    for path in paths:
        ids += tokenizer(Path(path).read_text(errors="replace"))["input_ids"]
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
