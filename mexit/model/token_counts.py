"""Token frequencies stored with a checkpoint, and the frequency-ranked draft vocabulary they give (FR-Spec, Zhao et
al. 2025: a draft head restricted to the most frequent tokens).

`token_counts.safetensors` beside the weights: `counts` [V] int64, how often each token occurs in the text the
counting command read (metadata: which files, how many tokens). `mexit count-tokens`, `train-heads` and
`train-exit-predictors` write it; `load` reads it with the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import TOKEN_COUNTS_FILE, read_side_file, replace_file


def count_tokens(blocks: torch.Tensor, vocab: int) -> torch.Tensor:
    """[V] int64 occurrences of each id in blocks (any shape of int64 ids below `vocab`)."""
    return torch.bincount(blocks.reshape(-1).cpu(), minlength=vocab)[:vocab]


def save_token_counts(folder: Path, counts: torch.Tensor, sources: list[str]) -> Path:
    """Write `token_counts.safetensors` into `folder` (under a temporary name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(folder) / TOKEN_COUNTS_FILE
    tensors = {"counts": counts.to(torch.long).cpu().contiguous()}
    metadata = {"format": "pt", "sources": json.dumps(sources), "tokens": str(int(counts.sum()))}
    replace_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_token_counts(folder: Path, vocab: int) -> torch.Tensor | None:
    """The folder's counts [V] int64 on the CPU, checked against the vocabulary; None without the file."""
    path = Path(folder) / TOKEN_COUNTS_FILE
    if not path.is_file():
        return None
    tensors, _ = read_side_file(path, "count again with `mexit count-tokens --overwrite`")
    counts = tensors.get("counts")
    if counts is None or counts.shape != (vocab,) or counts.dtype != torch.long or bool((counts < 0).any()):
        raise ValueError(f"{path}: expected counts [{vocab}] int64 >= 0, got "
                         f"{None if counts is None else (tuple(counts.shape), str(counts.dtype))}")
    return counts


def draft_vocabulary(counts: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int64 ascending: the ids of the n most frequent tokens (ties: the lower id first)."""
    order = torch.sort(-counts, stable=True).indices  # descending counts, ascending ids among equal counts
    return order[:n].sort().values
