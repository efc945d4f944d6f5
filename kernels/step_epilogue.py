"""The decode step's epilogue as device functions, folded into the kernel that picks the token (the exit stage's
merge, the ACD merge, the early-exit decision), and as a small kernel of its own where no such kernel runs (a
sampled token). Program b finishes row b: eos masking, the output column, the next step's input embedding and
position. The shared step index and cache slot advance in the last program to finish: each program counts itself
in `arrivals` with an acquire-release atomic after its last read of them, and the one that sees every other
program arrived writes step + 1, slot + 1 and resets the count for the next kernel. So a decode step needs no torch
operation around its kernels, and a CUDA graph of it holds only kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pdl_options
from .step_epilogue_ref import EOS_SLOTS, StepIO

_EOS_SLOTS = tl.constexpr(EOS_SLOTS)


@triton.jit
def finish_row(b, token, io, h_copy_ptr, T, D, P, COPY: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row b's share of `step_epilogue_ref` (the step index and slot are advanced by `arrive`). io: the step state's
    pointers in `StepIO.pointers()` order. With COPY, the next input h0 is also written to h_copy (early exit's
    frozen state). Returns whether row b is finished."""
    tokens_ptr, positions_ptr, finished_ptr, eos_ptr, out_ptr, step_ptr = io[0], io[1], io[2], io[3], io[4], io[5]
    wte_ptr, wpe_ptr, h0_ptr = io[8], io[9], io[10]
    step = tl.load(step_ptr)
    stops = tl.load(eos_ptr + tl.arange(0, _EOS_SLOTS))  # the stop ids, -1 in unused slots
    done = tl.load(finished_ptr + b).to(tl.int1)
    token = tl.where(done, tl.load(eos_ptr), token)
    done = done | (tl.max((stops == token).to(tl.int32), axis=0) != 0)
    tl.store(finished_ptr + b, done)
    tl.store(out_ptr + b.to(tl.int64) * T + step, token)
    tl.store(tokens_ptr + b, token)
    position = tl.load(positions_ptr + b) + 1
    tl.store(positions_ptr + b, position)
    wte_row = wte_ptr + tl.maximum(token, 0).to(tl.int64) * D
    wpe_row = wpe_ptr + tl.minimum(position, P - 1).to(tl.int64) * D
    dd = tl.arange(0, BLOCK_D)
    for k in range(0, D, BLOCK_D):
        ok = (k + dd) < D
        h = tl.load(wte_row + k + dd, mask=ok) + tl.load(wpe_row + k + dd, mask=ok)
        tl.store(h0_ptr + b.to(tl.int64) * D + k + dd, h, mask=ok)
        if COPY:
            tl.store(h_copy_ptr + b.to(tl.int64) * D + k + dd, h, mask=ok)
    return done


@triton.jit
def arrive(n_programs, step_ptr, slot_ptr, arrivals_ptr, ADVANCE: tl.constexpr = True):
    """Count this program in; the last of n_programs resets the count and (ADVANCE) advances the step index and
    the slot. Call after the program's last read of step and slot and its last write that the last program reads
    (a barrier orders every thread's accesses before the release). Returns whether this program is the last."""
    step = tl.load(step_ptr)
    slot = tl.load(slot_ptr)
    tl.debug_barrier()
    last = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel") == n_programs - 1
    if ADVANCE:
        tl.store(step_ptr, step + 1, mask=last)
        tl.store(slot_ptr, slot + 1, mask=last)
    tl.store(arrivals_ptr, 0, mask=last)
    return last


@triton.jit
def _step_epilogue(
    token_ptr,  # [B] int64: this step's choice per row
    io,  # the step state: StepIO.pointers() (tokens, positions, finished, eos, out, step, slot, arrivals, wte, wpe, h0)
    B, T, D, P,  # rows, out's row length, embedding width, positions
    BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # first let the next kernel launch (its reads wait for this kernel's end), then wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b = tl.program_id(0)
    finish_row(b, tl.load(token_ptr + b), io, io[10], T, D, P, False, BLOCK_D)
    arrive(B, io[5], io[6], io[7])


def embed_block(d: int) -> int:
    """Columns of h0 a program writes per iteration."""
    return min(triton.next_power_of_2(d), 1024)


def step_epilogue(token: torch.Tensor, io: StepIO, pdl: bool = False) -> None:
    """Triton version of `step_epilogue_ref` (one program per row): token [B] int64 on io's device."""
    B = io.tokens.shape[0]
    if token.shape != (B,) or token.dtype != torch.int64:
        raise ValueError(f"token must be int64 [{B}], got {tuple(token.shape)} {token.dtype}")
    T, D, P = io.sizes()
    _step_epilogue[(B,)](token.contiguous(), io.pointers(), B, T, D, P, BLOCK_D=embed_block(D), USE_PDL=pdl,
                         **pdl_options(pdl))
