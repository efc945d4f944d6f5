"""ACD contrast and greedy token choice on the exit stage's logits (Gera et al. 2023; the formula in
`acd_contrast_ref`), in two launches.

Stage 1 (`_acd_tiles`, grid = vocabulary tiles x rows): marks the plausible set S with a logit threshold (see
`plausibility_threshold`) and stores per tile: the max of d = log p_u - log p_l over S (+ index), the sum of
exp(d - max) over S, the upper mass of S, and the best log p_u outside S (+ index).
Stage 2 (`_acd_merge`, one program per row): merges the tiles into log-sum-exp over S, picks the argmax of
log q (first index on ties) and, if asked, writes log q = d - lse_S(d) + log mass(S) on S, log p_u elsewhere.
With one candidate at least (the default) the threshold comes from the exit stage's max logit inside both stages;
with `emit` (greedy decoding) the merge ends the decode step with its token (`step_epilogue.finish_row`): the
contrast is then two launches and no torch operation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import pdl_options
from .step_epilogue import arrive, embed_block, finish_row
from .step_epilogue_ref import StepIO


@triton.jit
def _threshold(thr_ptr, b, log_alpha, FROM_MAX: tl.constexpr):
    """Row b's plausibility threshold on the upper logits: thr[b], or max logit + log(alpha) (one candidate)."""
    if FROM_MAX:
        return tl.load(thr_ptr + b) + log_alpha
    return tl.load(thr_ptr + b)


@triton.jit
def _acd_tiles(
    logits_ptr, lse_ptr, thr_ptr, stats_ptr, arg_ptr, B, V, n_tiles, log_alpha,
    BLOCK_V: tl.constexpr, THR_FROM_MAX: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # first let the next kernel launch (its reads wait for this kernel's end), then wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_v = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < V
    upper = tl.load(logits_ptr + b.to(tl.int64) * V + cols, mask=ok, other=float("-inf"))
    lower = tl.load(logits_ptr + (B + b).to(tl.int64) * V + cols, mask=ok, other=0.0)
    lp_u = upper - tl.load(lse_ptr + b)
    lp_l = lower - tl.load(lse_ptr + B + b)
    p_u = tl.exp(lp_u)
    in_s = ok & (upper >= _threshold(thr_ptr, b, log_alpha, THR_FROM_MAX))
    d = tl.where(in_s, lp_u - lp_l, float("-inf"))
    d_max = tl.max(d, axis=0)
    d_arg = pid_v * BLOCK_V + tl.argmax(d, axis=0, tie_break_left=True)
    shift = tl.where(d_max == float("-inf"), 0.0, d_max)
    d_sum = tl.sum(tl.where(in_s, tl.exp(d - shift), 0.0), axis=0)
    mass = tl.sum(tl.where(in_s, p_u, 0.0), axis=0)
    outside = tl.where(ok & (~in_s), lp_u, float("-inf"))
    o_max = tl.max(outside, axis=0)
    o_arg = pid_v * BLOCK_V + tl.argmax(outside, axis=0, tie_break_left=True)
    plane = B * n_tiles  # stats: [4, B, n_tiles] = d_max, d_sum, mass, o_max; args: [2, B, n_tiles]
    i = b * n_tiles + pid_v
    tl.store(stats_ptr + i, d_max)
    tl.store(stats_ptr + plane + i, d_sum)
    tl.store(stats_ptr + 2 * plane + i, mass)
    tl.store(stats_ptr + 3 * plane + i, o_max)
    tl.store(arg_ptr + i, d_arg)
    tl.store(arg_ptr + plane + i, o_arg)


@triton.jit
def _acd_merge(
    stats_ptr,  # [4, B, n_tiles] fp32: per tile max of d over S, sum of exp, upper mass of S, best log p_u off S
    arg_ptr,  # [2, B, n_tiles] int32: their indices
    logits_ptr,  # [2, B, V] fp32, upper exit first
    lse_ptr,  # [2, B] fp32
    thr_ptr,  # [B] fp32: the plausibility threshold, or the max upper logit (THR_FROM_MAX)
    token_ptr,  # [B] int64: the greedy token
    log_q_ptr,  # [B, V] fp32 (WRITE_LOG_Q)
    io,  # EMIT: the step state, StepIO.pointers() (tokens, positions, finished, eos, out, step, slot, arrivals, ...)
    B, V, n_tiles, log_alpha,
    T, D, P,  # EMIT: out's row length, embedding width, positions
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_LOG_Q: tl.constexpr, THR_FROM_MAX: tl.constexpr,
    EMIT: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # first let the next kernel launch (its reads wait for this kernel's end), then wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < n_tiles
    plane = B * n_tiles
    base = stats_ptr + b * n_tiles + t
    d_max = tl.load(base, mask=t_ok, other=float("-inf"))
    best_d = tl.max(d_max, axis=0)  # S is never empty: it holds the argmax of p_u
    first_d = tl.argmax(d_max, axis=0, tie_break_left=True)
    scale = tl.where(d_max == float("-inf"), 0.0, tl.exp(d_max - best_d))
    d_total = tl.sum(tl.load(base + plane, mask=t_ok, other=0.0) * scale, axis=0)
    log_mass = tl.log(tl.sum(tl.load(base + 2 * plane, mask=t_ok, other=0.0), axis=0))
    o_max = tl.load(base + 3 * plane, mask=t_ok, other=float("-inf"))
    best_o = tl.max(o_max, axis=0)
    first_o = tl.argmax(o_max, axis=0, tie_break_left=True)
    token_s = tl.load(arg_ptr + b * n_tiles + first_d)
    token_o = tl.load(arg_ptr + plane + b * n_tiles + first_o)
    lse_s = best_d + tl.log(d_total)
    score_s = best_d - lse_s + log_mass
    pick_s = (score_s > best_o) | ((score_s == best_o) & (token_s < token_o))
    token = tl.where(pick_s, token_s, token_o).to(tl.int64)
    tl.store(token_ptr + b, token)
    if WRITE_LOG_Q:
        lse_u = tl.load(lse_ptr + b)
        lse_l = tl.load(lse_ptr + B + b)
        thr = _threshold(thr_ptr, b, log_alpha, THR_FROM_MAX)
        for v in range(0, V, BLOCK_V):
            cols = v + tl.arange(0, BLOCK_V)
            ok = cols < V
            upper = tl.load(logits_ptr + b.to(tl.int64) * V + cols, mask=ok, other=0.0)
            lp_u = upper - lse_u
            lp_l = tl.load(logits_ptr + (B + b).to(tl.int64) * V + cols, mask=ok, other=0.0) - lse_l
            log_q = tl.where(upper >= thr, lp_u - lp_l - lse_s + log_mass, lp_u)
            tl.store(log_q_ptr + b.to(tl.int64) * V + cols, log_q, mask=ok)
    if EMIT:
        finish_row(b, token, io, io[10], T, D, P, False, BLOCK_D)
        arrive(B, io[5], io[6], io[7])


def plausibility_threshold(logits: torch.Tensor, alpha: float, min_candidates: int) -> torch.Tensor:
    """[B] fp32 threshold on the upper logits [B, V]: p_u >= min(alpha * max p_u, k-th largest p_u) is
    z_u >= min(max z_u + log alpha, k-th largest z_u). Comparing logits keeps the k-th candidate in S exactly
    (recomputing its probability could round it out). Device-side ops only, no host sync."""
    top = logits.topk(min_candidates, dim=-1).values
    return torch.minimum(top[:, 0] + math.log(alpha), top[:, -1]).contiguous()


def acd_contrast(logits: torch.Tensor, lse: torch.Tensor, alpha: float = 0.1, min_candidates: int = 1,
                 with_logprobs: bool = False, block_v: int = 1024, max_logit: torch.Tensor | None = None,
                 emit: StepIO | None = None, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [2, B, V] fp32 (upper exit first), lse [2, B] fp32 -> (greedy token [B] int64, log q [B, V] fp32
    or None). Same function as `acd_contrast_ref` followed by argmax. max_logit ([2, B] or [B] fp32, the exit
    stage's): with min_candidates 1 the threshold is taken from it inside the kernels (no torch operation).
    emit: the merge also emits the token and advances the step, as `step_epilogue_ref(token, emit)`. pdl: launch
    with programmatic dependent launch (`kernels.launch`)."""
    if logits.dim() != 3 or logits.shape[0] != 2 or logits.dtype != torch.float32:
        raise ValueError(f"acd_contrast takes fp32 logits [2, B, V], got {tuple(logits.shape)} {logits.dtype}")
    _, B, V = logits.shape
    if emit is not None and emit.tokens.shape[0] != B:
        raise ValueError(f"emit's state has {emit.tokens.shape[0]} rows, the logits {B}")
    logits, lse = logits.contiguous(), lse.contiguous()
    from_max = min_candidates == 1 and max_logit is not None
    thr = max_logit.reshape(-1, B)[0].contiguous() if from_max else plausibility_threshold(logits[0], alpha,
                                                                                          min_candidates)
    n_tiles = triton.cdiv(V, block_v)
    stats = torch.empty(4, B, n_tiles, device=logits.device, dtype=torch.float32)
    args = torch.empty(2, B, n_tiles, device=logits.device, dtype=torch.int32)
    options = pdl_options(pdl)
    _acd_tiles[(n_tiles, B)](logits, lse, thr, stats, args, B, V, n_tiles, math.log(alpha), BLOCK_V=block_v,
                             THR_FROM_MAX=from_max, USE_PDL=pdl, num_warps=4, **options)
    token = torch.empty(B, device=logits.device, dtype=torch.int64)
    log_q = torch.empty(B, V, device=logits.device, dtype=torch.float32) if with_logprobs else token
    step_io = emit.pointers() if emit is not None else (token,) * 11
    T, D, P = emit.sizes() if emit is not None else (1, 1, 1)
    _acd_merge[(B,)](stats, args, logits, lse, thr, token, log_q, step_io, B, V, n_tiles, math.log(alpha), T, D, P,
                     BLOCK_T=triton.next_power_of_2(n_tiles), BLOCK_V=1024, WRITE_LOG_Q=with_logprobs,
                     THR_FROM_MAX=from_max, EMIT=emit is not None, BLOCK_D=embed_block(D), USE_PDL=pdl, num_warps=4,
                     **options)
    return token, (log_q if with_logprobs else None)
