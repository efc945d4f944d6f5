"""Plain PyTorch reference of the exit decision at a checked exit (no triton import)."""

from __future__ import annotations

import torch

from .step_epilogue_ref import StepIO, step_epilogue_ref


def exit_decide_ref(layer: int, confidence: torch.Tensor, thresholds: torch.Tensor, step: torch.Tensor,
                    running: torch.Tensor, fired: torch.Tensor, candidate: torch.Tensor | None, chosen: torch.Tensor,
                    h_last: torch.Tensor | None, h_exit: torch.Tensor, exit_at: torch.Tensor, conf_at: torch.Tensor,
                    flags: torch.Tensor, skip: torch.Tensor | None = None, fired_none: torch.Tensor | None = None,
                    final: bool = False, emit: StepIO | None = None, arrivals: torch.Tensor | None = None,
                    probe: tuple | None = None) -> None:
    """Rows still running whose confidence reaches the threshold exit at `layer`; everything updates in place.

    confidence [B] fp32; thresholds [T] fp32 (per step); step [1] int64 (this step: the threshold, and the column
    of exit_at / conf_at [B, T]); running, fired [B] bool; candidate (the exit's token, None when the head runs
    later, as for cosine), chosen [B] int64; h_last [B, d] (any row stride), h_exit [B, d]; flags [2] bool =
    (some row fired, some row still running). Predicated schedule: skip [1] int32 = no row running, fired_none [1]
    int32 = no row fired.
    final: the last layer: every running row exits here (no threshold; h_last unused).
    emit: the step ends here: `chosen` is emitted (`step_epilogue_ref`), then the next step is set up: running =
    not finished, h_exit = its input h0, and flags[1] / skip describe the next step's rows. arrivals: the kernel's
    counter (unused here). probe (weight [d] fp32, bias [1] fp32, eps): a learned exit predictor; the confidence is
    then computed here from h_last (`probe_confidence`) and written into `confidence`."""
    if probe is not None:
        confidence.copy_(probe_confidence(h_last, *probe))
    fire = running.clone() if final else running & (confidence >= thresholds.index_select(0, step))
    if candidate is not None:
        chosen.copy_(torch.where(fire, candidate, chosen))
    record_exits(fire, layer, confidence, step, exit_at, conf_at)
    if not final:
        h_exit.copy_(torch.where(fire[:, None], h_last, h_exit))
    fired.copy_(fire)
    running &= ~fire
    if emit is not None:
        running.copy_(~step_epilogue_ref(chosen, emit))
        h_exit.copy_(emit.h0)
    flags.copy_(torch.stack([fire.any(), running.any()]))
    if skip is not None:
        skip.copy_(~running.any())
    if fired_none is not None:
        fired_none.copy_(~fire.any())


def record_exits(mask: torch.Tensor, layer: int, confidence: torch.Tensor, step: torch.Tensor, exit_at: torch.Tensor,
                 conf_at: torch.Tensor) -> None:
    """Exit layer and confidence of the rows in `mask` ([B] bool) into column `step` of exit_at / conf_at."""
    column = exit_at.index_select(1, step)[:, 0]
    exit_at.index_copy_(1, step, torch.where(mask, layer, column)[:, None])
    column = conf_at.index_select(1, step)[:, 0]
    conf_at.index_copy_(1, step, torch.where(mask, confidence, column)[:, None])


def probe_confidence(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """A learned exit predictor's confidence: sigmoid(weight . standardize(h) + bias), standardize = layernorm
    without an affine over the last dimension. h [B, d] any float dtype, weight [d] fp32, bias [1] fp32 -> [B]
    fp32 (`mexit.model.predictors`), into `out` when given."""
    x = torch.nn.functional.layer_norm(h.float(), (h.shape[-1],), eps=eps)
    return torch.sigmoid(torch.addmv(bias, x, weight), out=out)
