"""Plain PyTorch reference of a speculative round's epilogue (no triton import): each row emits its accepted drafts
and the target's token, the round's cache slots are marked kept or rejected, and the next round is set up on the
device (Leviathan et al. 2023's accept step, after the acceptance test)."""

from __future__ import annotations

import torch

from .step_epilogue_ref import StepIO


def round_epilogue_ref(accepted: torch.Tensor, token: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor,
                       draft_i: torch.Tensor, count: torch.Tensor, drafted: torch.Tensor, io: StepIO,
                       valid: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """accepted [B] int64: each row's accepted drafts (a prefix); token [B] int64: the target's token after them;
    drafts [B, k] int64 and n_drafts [B] int64: the round's drafts and how many each row made; draft_i [1] int64:
    the round positions fed through the lower blocks; count [B] int64: tokens each row has (advanced); drafted
    [B, T] bool: per output column, whether a kept draft wrote it (written); io: the step state (out, finished,
    slot, positions, tokens advanced); valid [B, S] bool: the cache's slots holding a token (the round's slots
    written).

    An unfinished row writes its accepted drafts then token into its next columns, cut after its first stop id and
    at max_new_tokens tokens; it finishes at a stop id or the budget. The round's slot j stays valid for a row that
    was unfinished and accepted at least j drafts (a rejected draft's keys are no token's). The next round starts
    after the round's slots (its width: the most drafts made, plus one when every fed draft was proposed), at each
    row's position after its accepted drafts, with token as the next input. Returns was_finished [B] bool: the rows
    finished before this round."""
    k = drafts.shape[1]
    j = torch.arange(k + 1, device=io.tokens.device)
    is_draft = j < accepted[:, None]
    seq = torch.where(is_draft, torch.cat([drafts, drafts[:, :1]], 1), token[:, None])
    n_new = accepted + 1
    was_finished = io.finished.clone()
    stops = (seq[..., None] == io.eos).any(-1)  # [B, k + 1]: a stop id (io.eos pads with -1)
    is_eos = stops & (j < n_new[:, None])
    n_new = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, n_new)
    n_new = torch.minimum(n_new, max_new_tokens - count).masked_fill(was_finished, 0)
    write = j < n_new[:, None]
    cols = count[:, None] + j
    io.out.scatter_(1, cols, torch.where(write, seq, io.out.gather(1, cols)))
    drafted.scatter_(1, cols, torch.where(write, is_draft, drafted.gather(1, cols)))
    count.add_(n_new)
    ended = (write & stops).any(-1)
    io.finished.copy_(was_finished | ended | (count >= max_new_tokens))
    valid.index_copy_(1, io.slot + j, (j <= accepted[:, None]) & ~was_finished[:, None])
    width = n_drafts.max()
    io.slot.add_(torch.where(width == draft_i, width + 1, draft_i))
    io.positions.add_(accepted + 1)
    io.tokens.copy_(token)
    return was_finished
