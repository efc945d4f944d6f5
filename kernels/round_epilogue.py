"""A speculative round's epilogue as one kernel (instead of some thirty small torch launches per round).

One program holds the whole batch ([BLOCK_B, BLOCK_J] tiles: rows by round positions), since the next round's slot
depends on every row's drafts; it reads everything before a barrier and writes after it (the step state is
updated in place). Only loads, comparisons, integer adds and masked stores: bit-identical to
`round_epilogue_ref`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .step_epilogue_ref import EOS_SLOTS, StepIO

_EOS_SLOTS = tl.constexpr(EOS_SLOTS)


@triton.jit
def _round_epilogue(
    accepted_ptr, token_ptr, n_drafts_ptr, count_ptr,  # [B] int64
    drafts_ptr,  # [B, K] int64
    draft_i_ptr,  # [1] int64
    drafted_ptr,  # [B, T] bool
    out_ptr, finished_ptr, slot_ptr, positions_ptr, tokens_ptr, eos_ptr,  # the step state's
    valid_ptr,  # [B, S] bool: the cache's valid slots
    was_ptr,  # [B] bool: written, the rows finished before the round
    B, K, T, S, max_new_tokens,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
):
    bb = tl.arange(0, BLOCK_B)
    jj = tl.arange(0, BLOCK_J)
    row = bb < B
    rows = bb[:, None]  # the output's [BB, BJ] offsets in int32 (the wrapper checks they fit): fewer registers
    j = jj[None, :]
    cell = (bb[:, None] < B).to(tl.int32) * (j <= K).to(tl.int32)  # [BB, BJ]: a row's round position (int masks)
    # every read first: count, finished, positions and slot are updated in place, and a thread holding a copy of
    # an element must not read it after another thread stored the new value (the barrier below)
    accepted = tl.load(accepted_ptr + bb, mask=row, other=0)
    token = tl.load(token_ptr + bb, mask=row, other=0)
    count = tl.load(count_ptr + bb, mask=row, other=0)
    was = tl.load(finished_ptr + bb, mask=row, other=1).to(tl.int32)
    positions = tl.load(positions_ptr + bb, mask=row, other=0)
    slot = tl.load(slot_ptr)
    width = tl.max(tl.load(n_drafts_ptr + bb, mask=row, other=0), axis=0)
    fed = tl.load(draft_i_ptr)
    is_draft = (j < accepted[:, None]).to(tl.int32) * cell  # accepted <= K: a draft position is below K
    seq = tl.where(is_draft != 0, tl.load(drafts_ptr + rows * K + j, mask=is_draft != 0, other=0), token[:, None])
    stops = tl.zeros([BLOCK_B, BLOCK_J], dtype=tl.int32)
    for e in tl.static_range(_EOS_SLOTS):  # a stop id (unused slots hold -1, never a token)
        stops = stops | (seq == tl.load(eos_ptr + e)).to(tl.int32)
    tl.debug_barrier()
    n_new = accepted + 1
    is_eos = stops * (j < n_new[:, None]).to(tl.int32)
    first = tl.min(tl.where(is_eos != 0, j, BLOCK_J), axis=1)  # the first stop among the new tokens
    n_new = tl.where(first < BLOCK_J, first + 1, n_new)
    n_new = tl.minimum(n_new, max_new_tokens - count)
    n_new = tl.where(was != 0, 0, n_new)
    write = (j < n_new[:, None]).to(tl.int32) * cell
    columns = rows * T + count[:, None].to(tl.int32) + j
    tl.store(out_ptr + columns, seq, mask=write != 0)
    tl.store(drafted_ptr + columns, is_draft != 0, mask=write != 0)
    count = count + n_new
    tl.store(count_ptr + bb, count, mask=row)
    ended = tl.max(write * stops, axis=1)
    finished = (was + ended + (count >= max_new_tokens).to(tl.int32)) != 0
    tl.store(finished_ptr + bb, finished, mask=row)
    tl.store(was_ptr + bb, was != 0, mask=row)
    kept = (j <= accepted[:, None]).to(tl.int32) * (was == 0).to(tl.int32)[:, None]
    # slots past the cache are never written (the reference raises there; the mode sizes the cache for its rounds)
    tl.store(valid_ptr + rows.to(tl.int64) * S + slot + j, kept != 0, mask=(cell != 0) & (slot + j < S))
    tl.store(slot_ptr, slot + tl.where(width == fed, width + 1, fed))
    tl.store(positions_ptr + bb, positions + accepted + 1, mask=row)
    tl.store(tokens_ptr + bb, token, mask=row)


def round_epilogue(accepted: torch.Tensor, token: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor,
                   draft_i: torch.Tensor, count: torch.Tensor, drafted: torch.Tensor, io: StepIO, valid: torch.Tensor,
                   max_new_tokens: int) -> torch.Tensor:
    """Triton version of `round_epilogue_ref` (same arguments, writes and result), one program: every tensor on
    io's device, contiguous, int64 but the bool drafted, valid and io.finished."""
    b, k = drafts.shape
    longs = (accepted, token, drafts, n_drafts, draft_i, count, io.out, io.slot, io.positions, io.tokens, io.eos)
    if any(t.dtype != torch.int64 for t in longs) or any(t.dtype != torch.bool for t in (drafted, valid, io.finished)):
        raise ValueError("round_epilogue takes int64 indices and tokens and bool masks (see round_epilogue_ref)")
    if not all(t.is_contiguous() for t in (*longs, drafted, valid, io.finished)):
        raise ValueError("round_epilogue takes contiguous tensors")
    if drafted.shape != io.out.shape or valid.shape[0] != b or io.eos.shape != (EOS_SLOTS,) or \
            len({t.device for t in (*longs, drafted, valid, io.finished)}) != 1:
        raise ValueError(f"round_epilogue: drafted {tuple(drafted.shape)} must match out {tuple(io.out.shape)}, "
                         f"valid have {b} rows, eos {EOS_SLOTS} slots, every tensor one device")
    if io.out.numel() >= 2**31 or drafts.numel() >= 2**31:  # the kernel's int32 offsets into them
        raise ValueError(f"round_epilogue: out {tuple(io.out.shape)} or drafts {tuple(drafts.shape)} exceed its "
                         "int32 offsets")
    was = torch.empty(b, dtype=torch.bool, device=token.device)
    block_b, block_j = triton.next_power_of_2(b), triton.next_power_of_2(k + 1)
    cells = block_b * block_j  # one program: past 512 cells, more warps (4 cells a thread, up to 16 warps)
    _round_epilogue[(1,)](accepted, token, n_drafts, count, drafts, draft_i, drafted, io.out, io.finished, io.slot,
                          io.positions, io.tokens, io.eos, valid, was, b, k, io.out.shape[1], valid.shape[1],
                          max_new_tokens, BLOCK_B=block_b, BLOCK_J=block_j, num_warps=min(16, max(4, cells // 128)))
    return was
