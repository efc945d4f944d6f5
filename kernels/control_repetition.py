"""The repetition controls as one kernel (instead of some thirty small torch launches per step).

Program r handles score row r (sequence r // J: J rows per sequence, a speculative round's positions). It copies
the row, then, after a barrier, divides or multiplies the scores of the tokens the sequence holds up to `last[r]`
(each from the input score, so a token seen twice is penalized once), then, after another barrier, writes -inf
for every token that would complete an n-gram the sequence already holds. Only copies, comparisons, one multiply
and one correctly rounded divide per penalized token: bit-identical to `control_repetition_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _control_repetition(
    scores_ptr, out_ptr,  # [N, V] fp32
    history_ptr,  # [N // J, L] int64: each sequence's tokens by position
    last_ptr,  # [N] int64: the position each score row follows
    V, L, J, ngram, penalty,
    HAS_PENALTY: tl.constexpr, HAS_NGRAM: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_L: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row_in, row_out = scores_ptr + r * V, out_ptr + r * V
    seq = history_ptr + (r // J) * L
    last = tl.load(last_ptr + r)
    vv = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        m = (start + vv) < V
        tl.store(row_out + start + vv, tl.load(row_in + start + vv, mask=m), mask=m)
    pp = tl.arange(0, BLOCK_L)
    if HAS_PENALTY:
        tl.debug_barrier()
        for start in range(0, L, BLOCK_L):
            p = start + pp
            m = (p < L) & (p <= last)
            token = tl.load(seq + p, mask=m, other=0)
            s = tl.load(row_in + token, mask=m, other=0.0)
            penalized = tl.where(s < 0, s * penalty, tl.math.div_rn(s, penalty))
            tl.store(row_out + token, penalized, mask=m)
    if HAS_NGRAM:
        tl.debug_barrier()
        # windows seq[end - ngram + 1 .. end] with end in [ngram - 1, min(last, L - 1)], none while the sequence
        # is shorter than ngram - 1 (int masks: the interpreter mishandles some bool & bool)
        hi = tl.where(last >= ngram - 2, tl.minimum(last, L - 1), -1)
        for start in range(0, L, BLOCK_L):
            end = start + pp
            hit = (end >= ngram - 1).to(tl.int32) * (end <= hi).to(tl.int32)
            for k in range(0, ngram - 1):  # the window's first ngram - 1 tokens equal the sequence's last ngram - 1
                a = tl.load(seq + end - ngram + 1 + k, mask=hit != 0, other=0)
                b = tl.load(seq + last - ngram + 2 + k + tl.zeros_like(end), mask=hit != 0, other=0)
                hit = hit * (a == b).to(tl.int32)
            token = tl.load(seq + end, mask=hit != 0, other=0)
            tl.store(row_out + token, tl.full([BLOCK_L], float("-inf"), tl.float32), mask=hit != 0)


def control_repetition(scores: torch.Tensor, history: torch.Tensor, last: torch.Tensor, penalty: float,
                       ngram: int) -> torch.Tensor:
    """Triton version of `control_repetition_ref` (same arguments and result; a new tensor). scores fp32 [N, V]
    with last [N], or [N, J, V] with last [N, J]; history [N, L] int64."""
    if penalty == 1.0 and not ngram:
        return scores
    shape = scores.shape
    rows = scores.reshape(-1, shape[-1]).float().contiguous()
    last = last.reshape(-1).contiguous()
    history = history.contiguous()
    n, v = rows.shape
    j = n // history.shape[0]
    if j * history.shape[0] != n or last.shape[0] != n:
        raise ValueError(f"scores {tuple(shape)}, history {tuple(history.shape)} and last do not fit together")
    out = torch.empty_like(rows)
    _control_repetition[(n,)](rows, out, history, last, v, history.shape[1], j, ngram, float(penalty),
                              HAS_PENALTY=penalty != 1.0, HAS_NGRAM=bool(ngram) and ngram <= history.shape[1],
                              BLOCK_V=min(4096, triton.next_power_of_2(v)),
                              BLOCK_L=min(1024, triton.next_power_of_2(history.shape[1])), num_warps=4)
    return out.view(shape)
