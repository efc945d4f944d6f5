"""Plain PyTorch reference of the repetition controls (no triton import): transformers' repetition penalty and
n-gram ban on a mode's scores, from each row's sequence kept on the device by position."""

from __future__ import annotations

import torch


def penalize_repetition(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor (CTRL, Keskar et al. 2019): for every token the row has seen
    (prompt and output so far), a score below 0 is multiplied by `penalty` and one above divided by it. scores:
    [B, V] fp32 (a head's logits, ACD's log q, DoLa's scores); seen: [B, V] bool."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def seen_tokens(history: torch.Tensor, last: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, V] bool: the tokens of each sequence up to and including position last. history: [N, L] int64 the
    sequence by position (entries past `last` are ignored); last: [N] int64."""
    written = torch.arange(history.shape[1], device=history.device) <= last[:, None]
    seen = torch.zeros(history.shape[0], vocab + 1, dtype=torch.bool, device=history.device)
    return seen.scatter_(1, torch.where(written, history, vocab), True)[:, :vocab]


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, last: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor: a token that would complete an n-gram already in the row's
    sequence gets -inf. scores: [N, V]; history: [N, L] int64 each sequence by position (entries past `last` are
    ignored); last: [N] int64 the position of its last token. No device-to-host read (CUDA graphs)."""
    b, v = scores.shape
    if n > history.shape[1]:  # longer than any sequence this batch can hold: nothing to ban
        return scores
    if n == 1:  # every token the row has seen
        return scores.masked_fill(seen_tokens(history, last, v), -float("inf"))
    windows = history.unfold(1, n, 1)  # [N, W, n]: window w covers positions w .. w + n - 1
    ends = torch.arange(windows.shape[1], device=scores.device) + n - 1
    offsets = torch.arange(2 - n, 1, device=scores.device)  # the sequence's last n - 1 positions
    recent = history.gather(1, (last[:, None] + offsets).clamp(min=0))
    match = (windows[..., :-1] == recent[:, None, :]).all(-1) & (ends <= last[:, None]) & (last >= n - 2)[:, None]
    banned = torch.zeros(b, v + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(match, windows[..., -1], v), True)
    return scores.masked_fill(banned[:, :v], -float("inf"))


def control_repetition_ref(scores: torch.Tensor, history: torch.Tensor, last: torch.Tensor, penalty: float,
                           ngram: int) -> torch.Tensor:
    """A mode's scores after the repetition controls: the penalty (1: off) on the tokens seen, then the banned
    n-grams of size `ngram` (0: off); unchanged without them. scores: [N, V] fp32 with last [N], or [N, J, V] with
    last [N, J] (J positions of each sequence: a speculative round's drafts, written in history); history: [N, L]
    int64 each sequence by position; last: the position each score follows."""
    if penalty == 1.0 and not ngram:
        return scores
    shape = scores.shape
    if last.dim() == 2:
        history = history.repeat_interleave(last.shape[1], dim=0)
        scores, last = scores.reshape(-1, shape[-1]), last.reshape(-1)
    if penalty != 1.0:
        scores = penalize_repetition(scores, seen_tokens(history, last, shape[-1]), penalty)
    if ngram:
        scores = ban_repeated_ngrams(scores, history, last, ngram)
    return scores.reshape(shape)
