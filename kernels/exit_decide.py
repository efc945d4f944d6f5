"""The exit decision at a checked exit as one kernel (instead of some twenty small element-wise launches).

Program b decides row b: reads its confidence and the step's threshold (both on the device), exits it if it is
running and confident enough, records its exit layer and confidence in the step's column, takes its token and
freezes its hidden state, and updates `running` / `fired`. The last program to finish (counted in `arrivals`
with an acquire-release atomic, as in `step_epilogue.arrive`) reduces over the rows and writes the flags the
host (segment schedule) or the later kernels (predicated schedule) read. At the last layer (`final`) every running
row exits; with `emit` the decision also ends the decode step (`step_epilogue.finish_row`) and sets the next one
up. Only comparisons and copies: bit-identical to `exit_decide_ref`; with a learned exit predictor (`probe`) the
program also computes its row's confidence from the states (d + 1 weights), equal to the reference's up to fp32
rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pdl_options
from .step_epilogue import arrive, embed_block, finish_row
from .step_epilogue_ref import StepIO


@triton.jit
def _exit_decide(
    conf_ptr,  # [B] fp32: each row's confidence at this layer
    thresholds_ptr,  # [T] fp32: the threshold of each step
    state,  # exit bookkeeping: running [B] bool, fired [B] bool, chosen [B] int64, h_exit [B, D], exit_at [B, T]
    #         int64, conf_at [B, T] fp32, flags [2] bool (a row fired, a row runs)
    candidate_ptr,  # [B] int64 (HAS_CANDIDATE): this exit's token
    h_last_ptr,  # [B, D] rows h_last_stride apart: the states at this layer (not FINAL)
    skip_ptr, fired_none_ptr,  # [1] int32 (HAS_SKIP, HAS_FIRED_NONE): no row runs / no row fired
    io,  # the step state, StepIO.pointers(): io[5] the step index, io[7] the arrival count; the rest with EMIT
    probe_w_ptr, probe_b_ptr,  # HAS_PROBE: a learned exit predictor, weight [D] fp32, bias [1] fp32
    B, D, T, h_last_stride, layer,
    T_out, P,  # EMIT: out's row length, positions
    eps,  # HAS_PROBE: the standardization's epsilon
    HAS_CANDIDATE: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_FIRED_NONE: tl.constexpr, FINAL: tl.constexpr,
    EMIT: tl.constexpr, HAS_PROBE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # first let the next kernel launch (its reads wait for this kernel's end), then wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    running_ptr, fired_ptr, chosen_ptr, h_exit_ptr = state[0], state[1], state[2], state[3]
    exit_at_ptr, conf_at_ptr, flags_ptr = state[4], state[5], state[6]
    step_ptr, arrivals_ptr = io[5], io[7]
    b = tl.program_id(0)
    step = tl.load(step_ptr)
    if HAS_PROBE:  # confidence = sigmoid(w . standardize(h) + b), two passes over the row (mean, then the rest)
        dd0 = tl.arange(0, BLOCK_D)
        row = h_last_ptr + b.to(tl.int64) * h_last_stride
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            total += tl.load(row + start + dd0, mask=(start + dd0) < D, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / D
        sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        dot = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            m = (start + dd0) < D
            x = tl.where(m, tl.load(row + start + dd0, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            sq += x * x
            dot += x * tl.load(probe_w_ptr + start + dd0, mask=m, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / D + eps)
        confidence = tl.sigmoid(tl.sum(dot, axis=0) * rstd + tl.load(probe_b_ptr))
        tl.store(conf_ptr + b, confidence)
    else:
        confidence = tl.load(conf_ptr + b)
    running = tl.load(running_ptr + b).to(tl.int32) != 0
    if FINAL:
        fire = running
    else:
        fire = running & (confidence >= tl.load(thresholds_ptr + step))
    token = tl.load(chosen_ptr + b)
    if HAS_CANDIDATE:
        token = tl.where(fire, tl.load(candidate_ptr + b), token)
        tl.store(chosen_ptr + b, token)
    column = b.to(tl.int64) * T + step
    tl.store(exit_at_ptr + column, tl.zeros_like(step) + layer, mask=fire)  # int64 (layer may be a constexpr 1)
    tl.store(conf_at_ptr + column, confidence, mask=fire)
    dd = tl.arange(0, BLOCK_D)
    if not FINAL:
        copied = tl.where(fire, D, 0)  # columns to freeze, as a vector mask (the interpreter mishandles bool & bool)
        for start in range(0, D, BLOCK_D):
            m = (start + dd) < copied
            h = tl.load(h_last_ptr + b.to(tl.int64) * h_last_stride + start + dd, mask=m)
            tl.store(h_exit_ptr + b.to(tl.int64) * D + start + dd, h, mask=m)
    tl.store(fired_ptr + b, fire)
    still = running & (fire == 0)
    if EMIT:  # the step ends: emit the token, the row runs next step unless it finished; its state is the input
        done = finish_row(b, token, io, h_exit_ptr, T_out, D, P, True, BLOCK_D)
        still = done == 0
    tl.store(running_ptr + b, still)
    if EMIT:
        last = arrive(B, step_ptr, io[6], arrivals_ptr)
    else:
        last = arrive(B, step_ptr, step_ptr, arrivals_ptr, False)
    if last:  # every row is decided: the flags over all rows
        rows = tl.arange(0, BLOCK_B)
        ok = rows < B
        any_fired = tl.max(tl.load(fired_ptr + rows, mask=ok, other=0, volatile=True).to(tl.int32), axis=0)
        any_running = tl.max(tl.load(running_ptr + rows, mask=ok, other=0, volatile=True).to(tl.int32), axis=0)
        tl.store(flags_ptr, any_fired.to(tl.int1))
        tl.store(flags_ptr + 1, any_running.to(tl.int1))
        if HAS_SKIP:
            tl.store(skip_ptr, 1 - any_running)
        if HAS_FIRED_NONE:
            tl.store(fired_none_ptr, 1 - any_fired)


def exit_decide(layer: int, confidence: torch.Tensor, thresholds: torch.Tensor, step: torch.Tensor,
                running: torch.Tensor, fired: torch.Tensor, candidate: torch.Tensor | None, chosen: torch.Tensor,
                h_last: torch.Tensor | None, h_exit: torch.Tensor, exit_at: torch.Tensor, conf_at: torch.Tensor,
                flags: torch.Tensor, skip: torch.Tensor | None = None, fired_none: torch.Tensor | None = None,
                final: bool = False, emit: StepIO | None = None, arrivals: torch.Tensor | None = None,
                probe: tuple | None = None, pdl: bool = False) -> None:
    """Triton version of `exit_decide_ref` (same arguments; skip / fired_none int32; emit's step is `step`; with a
    probe the confidence is computed in the kernel, in fp32, and written into `confidence`, which must then be
    contiguous).
    arrivals: a [1] int32 zero the kernel counts its programs in and leaves zero (emit's, or a new one: pass one
    to keep a step free of torch operations). h_exit, exit_at, conf_at must be contiguous and h_last's rows
    contiguous; a strided confidence or candidate is copied. pdl: launch with programmatic dependent launch
    (`kernels.launch`)."""
    B, D = h_exit.shape
    if probe is not None and (final or h_last is None or not confidence.is_contiguous()):
        raise ValueError("a probe decides at a checked exit: it needs h_last, not final, and a contiguous confidence")
    confidence = confidence.contiguous()
    candidate = candidate.contiguous() if candidate is not None else None
    T = exit_at.shape[1]
    h_last = h_exit if h_last is None else h_last
    if not (h_exit.is_contiguous() and exit_at.is_contiguous() and conf_at.is_contiguous()) or h_last.stride(1) != 1:
        raise ValueError("h_exit, exit_at and conf_at must be contiguous, h_last's rows contiguous")
    if confidence.dtype != torch.float32 or conf_at.dtype != torch.float32 or exit_at.dtype != torch.int64:
        raise ValueError("confidence and conf_at must be float32, exit_at int64")
    if emit is not None and (emit.step is not step or emit.h0.shape != h_exit.shape):
        raise ValueError("emit must share the decision's step index and rows")
    if arrivals is None:
        arrivals = emit.arrivals if emit is not None else torch.zeros(1, dtype=torch.int32, device=h_exit.device)
    step_io = emit.pointers() if emit is not None else (chosen, chosen, fired, chosen, chosen, step, step, arrivals,
                                                         h_exit, h_exit, h_exit)
    step_io = step_io[:7] + (arrivals,) + step_io[8:]
    T_out, _, P = emit.sizes() if emit is not None else (1, D, 1)
    state = (running, fired, chosen, h_exit, exit_at, conf_at, flags)
    probe_w, probe_b, eps = probe if probe is not None else (confidence, confidence, 0.0)
    _exit_decide[(B,)](confidence, thresholds, state, candidate if candidate is not None else chosen, h_last,
                       skip if skip is not None else flags, fired_none if fired_none is not None else flags, step_io,
                       probe_w, probe_b, B, D, T, h_last.stride(0), layer, T_out, P, eps,
                       HAS_CANDIDATE=candidate is not None, HAS_SKIP=skip is not None,
                       HAS_FIRED_NONE=fired_none is not None, FINAL=final, EMIT=emit is not None,
                       HAS_PROBE=probe is not None,
                       BLOCK_B=max(triton.next_power_of_2(B), 2), BLOCK_D=embed_block(D), USE_PDL=pdl,
                       num_warps=4, **pdl_options(pdl))
