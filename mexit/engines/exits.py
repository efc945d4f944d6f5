"""Per-row exit state, the engines' part of early exit: the exit decision's bookkeeping (`ExitState`, the
early-exit decision op's tensors) and deferred state propagation (`PendingKV`: the keys/values a later token's
blocks are about to read, filled on either engine)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ExitState:
    """Per-row exit bookkeeping of B rows over T steps (see `exit_decide_ref`): thresholds [T + 1] fp32 (per
    step, and a spare one the step after the last arms); running, fired [B] bool; chosen [B] int64 (the step's token
    so far); h_exit [B, d] (frozen states); exit_at [B, T] int64 and conf_at [B, T] fp32 (per step: exit layer,
    confidence); flags [2] bool (a row fired, a row runs); no_confidence [B] fp32 zeros; tested [2, B] fp32: row 0
    `predicted` (a check's confidences: a learned predictor's, or a tested check's), row 1 `row_threshold` (the torch
    backend's tests: this step's threshold for running rows, +inf for the others), so one host read gives a test's
    outcome; candidate [B] int64 (a tested check's tokens); saved: {layer: [B, d]} states a cosine check compares
    with. Predicated schedule only: skip [1] int32 (no row runs), fired_skip [1] int32 (no row fired)."""

    thresholds: torch.Tensor
    running: torch.Tensor
    fired: torch.Tensor
    chosen: torch.Tensor
    h_exit: torch.Tensor
    exit_at: torch.Tensor
    conf_at: torch.Tensor
    flags: torch.Tensor
    no_confidence: torch.Tensor
    tested: torch.Tensor
    candidate: torch.Tensor
    saved: dict
    skip: torch.Tensor | None = None
    fired_skip: torch.Tensor | None = None
    predicted: torch.Tensor = dataclasses.field(init=False)
    row_threshold: torch.Tensor = dataclasses.field(init=False)

    @classmethod
    def new(cls, b: int, t: int, d: int, saved_layers, dtype, device, predicated: bool) -> ExitState:
        z = dict(device=device)
        return cls(torch.zeros(t + 1, **z), torch.zeros(b, dtype=torch.bool, **z),
                   torch.zeros(b, dtype=torch.bool, **z), torch.zeros(b, dtype=torch.long, **z),
                   torch.zeros(b, d, dtype=dtype, **z), torch.zeros(b, t, dtype=torch.long, **z),
                   torch.zeros(b, t, **z), torch.zeros(2, dtype=torch.bool, **z), torch.zeros(b, **z),
                   torch.zeros(2, b, **z), torch.zeros(b, dtype=torch.long, **z),
                   {layer: torch.zeros(b, d, dtype=dtype, **z) for layer in saved_layers},
                   torch.zeros(1, dtype=torch.int32, **z) if predicated else None,
                   torch.zeros(1, dtype=torch.int32, **z) if predicated else None)

    def __post_init__(self):
        self.predicted, self.row_threshold = self.tested  # views (made once: a view costs as much as a small op)

    def outcome(self, values: list) -> tuple[list[bool], list[bool]]:
        """A test's outcome from `tested` read on the host: (fired, running) per row. fired = confidence >= the row's
        threshold, compared as `torch.ge` compares fp32 values (both are exact as Python floats); running = the
        threshold is finite (`arm` gives rows not running +inf; an `ExitPolicy` threshold is finite). With
        `torch.set_flush_denormal(True)` the device would compare subnormal values as zeros: not supported."""
        confidence, threshold = values
        return ([c >= t for c, t in zip(confidence, threshold)],
                [t != math.inf for t in threshold])


class PendingKV:
    """Deferred state propagation: exited positions whose keys/values of blocks [first, depth) are still owed,
    filled right before blocks that need them run (FREE, Bae et al. 2023: deferred fill). Entries: (rows [n] int64,
    slots [n] int64, hidden [n, d], next block owed). fill_kv(hidden, first, end, rows, slots): the engine's state
    propagation of blocks first..end-1 (`DecodeState.fill_kv`: the model's, counted)."""

    def __init__(self, fill_kv: Callable, depth: int):
        self.fill_kv, self.depth = fill_kv, depth
        self.entries: list[list] = []

    def add(self, rows: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor, first: int) -> None:
        if first < self.depth and len(rows):
            self.entries.append([rows, slots, hidden, first])

    def fill(self, start: int, end: int) -> None:
        """Fill what blocks [start, end) owe, one batched fill per first block (its weights read once)."""
        due = [e for e in self.entries if e[3] < end]
        for first in sorted({max(e[3], start) for e in due}):
            group = [e for e in due if max(e[3], start) == first]
            rows, slots, hidden = (torch.cat([e[i] for e in group]) for i in range(3))
            self.fill_kv(hidden, first, end, rows, slots)
        for e in due:
            e[3] = end
        self.entries = [e for e in self.entries if e[3] < self.depth]

    def owed(self) -> int:
        """Keys/values (position x block) still owed."""
        return sum(len(e[0]) * (self.depth - e[3]) for e in self.entries)

    @torch.inference_mode()
    def flush(self) -> None:
        """Fill everything still owed (the cache is then complete)."""
        self.fill(0, self.depth)
