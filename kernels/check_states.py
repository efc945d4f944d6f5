"""The non-finite state check as one kernel (`check_states_ref`): program (i, s) reads token s of row i's new
state once, in fp32, and marks its cache slot when the state holds a NaN or an infinity. One launch per run of
blocks, no host read: the generation reads the marks once, at its end."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pdl_options


@triton.jit
def _check_states(h_ptr, health_ptr, valid_ptr, slot_ptr, rows_ptr, S, D, T, slot_int,
                  SLOT_ON_DEVICE: tl.constexpr, HAS_ROWS: tl.constexpr, USE_PDL: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    if USE_PDL:  # everything it reads is the previous kernels' output: let the next kernel start, then wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    i = tl.program_id(0)
    s = tl.program_id(1)
    row = i
    if HAS_ROWS:
        row = tl.load(rows_ptr + i)
    slot = slot_int
    if SLOT_ON_DEVICE:
        slot = tl.load(slot_ptr)
    t = slot + s
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(h_ptr + (i.to(tl.int64) * S + s) * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    mark = tl.sum(x * 0.0, axis=0)  # 0, or NaN when a value is not finite
    where = health_ptr + row.to(tl.int64) * T + t
    ok = tl.load(valid_ptr + row.to(tl.int64) * T + t).to(tl.int32) != 0
    tl.store(where, tl.load(where) + mark, mask=ok)


def check_states(h: torch.Tensor, health: torch.Tensor, valid: torch.Tensor, slot,
                 rows: torch.Tensor | None = None, pdl: bool = False) -> None:
    """Triton version of `check_states_ref` (same arguments; h in any float dtype, contiguous or not). pdl: launch
    with programmatic dependent launch (`kernels.launch`)."""
    b, s, d = h.shape
    h = h.contiguous()
    on_device = isinstance(slot, torch.Tensor)
    _check_states[(b, s)](h, health, valid, slot if on_device else h, rows if rows is not None else h, s, d,
                          health.shape[1], 0 if on_device else int(slot), SLOT_ON_DEVICE=on_device,
                          HAS_ROWS=rows is not None, USE_PDL=pdl, BLOCK_D=triton.next_power_of_2(d), num_warps=4,
                          **pdl_options(pdl))
