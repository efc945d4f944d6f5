"""The exit decision at a checked exit as one kernel (instead of some twenty small element-wise launches).

One program: reads the rows' confidences, the step's threshold (both on the device), decides which running rows
exit, records their exit layer and confidence in the step's column, takes their token, freezes their hidden
state, updates `running` / `fired`, and writes the flags the host (segment schedule) or the later kernels
(predicated schedule) read. Only comparisons and copies: bit-identical to `exit_decide_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LAUNCHES = {"exit_decide": 0}  # counts wrapper calls, so tests can assert which path ran


@triton.jit
def _exit_decide(
    conf_ptr, thresholds_ptr, step_ptr, running_ptr, fired_ptr, candidate_ptr, chosen_ptr, h_last_ptr, h_exit_ptr,
    exit_at_ptr, conf_at_ptr, flags_ptr, skip_ptr, fired_none_ptr,
    B, D, T, h_last_stride, layer,
    HAS_CANDIDATE: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_FIRED_NONE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_B)
    ok = rows < B
    step = tl.load(step_ptr)
    threshold = tl.load(thresholds_ptr + step)
    confidence = tl.load(conf_ptr + rows, mask=ok, other=0.0)
    running = tl.load(running_ptr + rows, mask=ok, other=0).to(tl.int32) != 0
    fire = running & (confidence >= threshold) & ok
    if HAS_CANDIDATE:
        candidate = tl.load(candidate_ptr + rows, mask=fire, other=0)
        tl.store(chosen_ptr + rows, candidate, mask=fire)
    column = rows.to(tl.int64) * T + step
    tl.store(exit_at_ptr + column, tl.zeros([BLOCK_B], dtype=tl.int64) + layer, mask=fire)
    tl.store(conf_at_ptr + column, confidence, mask=fire)
    cols = tl.arange(0, BLOCK_D)
    for start in range(0, D, BLOCK_D):
        m = fire[:, None] & ((start + cols) < D)[None, :]
        h = tl.load(h_last_ptr + rows.to(tl.int64)[:, None] * h_last_stride + start + cols[None, :], mask=m)
        tl.store(h_exit_ptr + rows.to(tl.int64)[:, None] * D + start + cols[None, :], h, mask=m)
    still = running & (fire == 0)
    tl.store(fired_ptr + rows, fire.to(tl.int1), mask=ok)
    tl.store(running_ptr + rows, still.to(tl.int1), mask=ok)
    any_fired = tl.max(fire.to(tl.int32), axis=0)
    any_running = tl.max(still.to(tl.int32), axis=0)
    tl.store(flags_ptr, any_fired.to(tl.int1))
    tl.store(flags_ptr + 1, any_running.to(tl.int1))
    if HAS_SKIP:
        tl.store(skip_ptr, 1 - any_running)
    if HAS_FIRED_NONE:
        tl.store(fired_none_ptr, 1 - any_fired)


def exit_decide(layer: int, confidence: torch.Tensor, thresholds: torch.Tensor, step: torch.Tensor,
                running: torch.Tensor, fired: torch.Tensor, candidate: torch.Tensor | None, chosen: torch.Tensor,
                h_last: torch.Tensor, h_exit: torch.Tensor, exit_at: torch.Tensor, conf_at: torch.Tensor,
                flags: torch.Tensor, skip: torch.Tensor | None = None,
                fired_none: torch.Tensor | None = None) -> None:
    """Triton version of `exit_decide_ref` (same arguments; skip / fired_none int32). h_exit, exit_at, conf_at
    must be contiguous and h_last's rows contiguous."""
    B, D = h_exit.shape
    T = exit_at.shape[1]
    if not (h_exit.is_contiguous() and exit_at.is_contiguous() and conf_at.is_contiguous()) or h_last.stride(1) != 1:
        raise ValueError("h_exit, exit_at and conf_at must be contiguous, h_last's rows contiguous")
    if confidence.dtype != torch.float32 or conf_at.dtype != torch.float32 or exit_at.dtype != torch.int64:
        raise ValueError("confidence and conf_at must be float32, exit_at int64")
    block_b = max(triton.next_power_of_2(B), 2)
    block_d = max(16, min(triton.next_power_of_2(D), 4096 // block_b))
    _exit_decide[(1,)](confidence, thresholds, step, running, fired, candidate if candidate is not None else chosen,
                       chosen, h_last, h_exit, exit_at, conf_at, flags, skip if skip is not None else flags,
                       fired_none if fired_none is not None else flags, B, D, T, h_last.stride(0), layer,
                       HAS_CANDIDATE=candidate is not None, HAS_SKIP=skip is not None,
                       HAS_FIRED_NONE=fired_none is not None, BLOCK_B=block_b, BLOCK_D=block_d,
                       num_warps=8 if block_b * block_d >= 4096 else 4)  # 4 warps spill at 4x1024 (aot_compile)
    LAUNCHES["exit_decide"] += 1
