"""The fixed modes: every token from one head (the original, or an exit) or from Autocontrastive Decoding of two
heads (Gera et al. 2023; autocontrastive-gen's calculate_contrasted_logits). Their settings are `heads.DecodeConfig`;
`FixedMode.scores` is the one place a mode's heads become its scores; `FixedMode.step` is the whole decode step, on
any engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mexit import ops
from mexit.values import plain_fields

from .heads import DecodeConfig, ModeScores
from .step import OneStep, Rows

if TYPE_CHECKING:
    from mexit.model.decoder import MultiExitGPT2


@dataclass(frozen=True)
class MultiExitConfiguration:
    """autocontrastive-gen's configuration names and defaults: set `use_original_head=False` and one of
    `output_layer_index` or `contrast_layer_indices=(upper, lower)` (upper may be "original"). Its string forms
    (`use_original_head="False"`, `contrast_layer_indices="original;4"`, `lm_head_layer_indices="2;4"`,
    `output_layer_index="6"`) are read as autocontrastive-gen reads them. vocab_projection_mode: only the exit
    heads' layer-specific projection (LAYER_SPECIFIC_PROJECTION, the published checkpoint's) is implemented."""

    vocab_projection_mode: object = "LAYER_SPECIFIC_PROJECTION"
    use_original_head: bool = True
    output_layer_index: int | None = None
    contrast_layer_indices: tuple | None = None
    contrast_function: object = None
    lm_head_layer_indices: tuple | None = None  # training-time fields of autocontrastive-gen: accepted, unused
    freeze_parameters: bool = False
    alpha: float = 0.1
    minimum_candidates: int = 1

    def __post_init__(self):
        plain_fields(self)
        def parsed(name, value):
            object.__setattr__(self, name, value)

        mode = getattr(self.vocab_projection_mode, "name", self.vocab_projection_mode)
        if str(mode).upper() != "LAYER_SPECIFIC_PROJECTION":
            raise ValueError(f"vocab_projection_mode {mode}: mexit implements LAYER_SPECIFIC_PROJECTION (a trained "
                             "head per exit) only")
        if isinstance(self.use_original_head, str):
            if self.use_original_head not in ("True", "False"):
                raise ValueError(f"use_original_head must be True or False, got {self.use_original_head!r}")
            parsed("use_original_head", self.use_original_head == "True")
        if isinstance(self.output_layer_index, str):
            parsed("output_layer_index", int(self.output_layer_index))
        for name in ("contrast_layer_indices", "lm_head_layer_indices"):
            value = getattr(self, name)
            if isinstance(value, str):
                parsed(name, tuple(v if v == "original" else int(v) for v in value.split(";")))
        if self.contrast_layer_indices is not None and self.use_original_head:
            raise ValueError(f"contrast_layer_indices={self.contrast_layer_indices!r} with use_original_head=True: "
                             "the original head alone or a contrast, not both (set use_original_head=False)")

    def to_decode_config(self) -> DecodeConfig:
        if self.contrast_function is not None:
            raise ValueError("custom contrast_function is not supported; mexit implements the ACD formula (alpha, "
                             "minimum_candidates)")
        chosen = sum([bool(self.use_original_head), self.output_layer_index is not None,
                      self.contrast_layer_indices is not None])
        if chosen != 1:
            raise ValueError("set exactly one of use_original_head=True, output_layer_index, contrast_layer_indices "
                             "(use_original_head defaults to True: set it to False to pick an exit)")
        if self.use_original_head:
            return DecodeConfig("original")
        if self.output_layer_index is not None:
            return DecodeConfig("exit", exit_layer=int(self.output_layer_index))
        pair = self.contrast_layer_indices
        if isinstance(pair, (str, int)) or len(pair) != 2:
            raise ValueError(f"contrast_layer_indices must be a pair (upper, lower), got {pair!r}")
        upper, lower = pair
        if lower == "original" or isinstance(lower, bool) or not isinstance(lower, int):
            raise ValueError(f"contrast_layer_indices=({upper!r}, {lower!r}): the lower entry must be an exit layer "
                             "number ('original' may only be the upper one)")
        if upper != "original" and (isinstance(upper, bool) or not isinstance(upper, int)):
            raise ValueError(f"contrast_layer_indices=({upper!r}, {lower!r}): the upper entry must be an exit layer "
                             "number or 'original'")
        return DecodeConfig("contrast", upper=upper, lower=int(lower), alpha=self.alpha,
                            min_candidates=self.minimum_candidates)


def teacher_forced(model: MultiExitGPT2, decode: DecodeConfig, ids: torch.Tensor, valid: torch.Tensor,
                   every_layer: bool = False) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One pass over left-padded ids [B, T] (valid [B, T] bool; positions count from each row's first token): the
    mode's logits [B, T, V] fp32 at every position (ACD: log q) and the block outputs {layer: [B, T, d]} it ran
    (0: the embeddings; every layer with every_layer)."""
    mode = FixedMode(model, decode)
    every = range(1, model.config.n_layer + 1) if every_layer else ()
    h, states = model.forward(ids, [*mode.layers, *every], valid)
    b, t, d = h.shape
    hidden = [states[layer].reshape(b * t, d) for layer in mode.layers]
    logits = mode.scores(hidden, ops.TORCH, logits=True).logits.view(b, t, -1)
    return logits, {0: h, **states}


class FixedMode(OneStep):
    """A decode step of a fixed mode: the heads' layers, their scores, the token."""

    keeps_logits = True

    def __init__(self, model: MultiExitGPT2, decode: DecodeConfig):
        decode.check(model.config)
        self.model, self.settings = model, decode
        self.layers = [model.layer_of(head) for head in decode.heads()]
        self.stops = sorted(set(self.layers))  # the layers whose states a step reads
        self.depth = max(self.layers)
        self.full_heads = len(self.layers)  # heads a step reads (it is full depth)

    def scores(self, hidden, backend: ops.Backend, scores: bool = False, logits: bool = False,
               emit=None) -> ModeScores:
        """The mode's next-token distribution from the raw states of its heads' layers (hidden: [E, B, d] or E
        tensors [B, d], in `settings.heads()` order; ln_f is applied here); the one place a fixed mode's heads become
        its scores. scores / logits: also return those. emit (a StepIO): the last kernel also ends the decode step
        with the greedy token (`step_epilogue_ref`)."""
        decode, model = self.settings, self.model
        if decode.mode != "contrast":
            out = model.exit_stage(hidden, decode.heads(), backend, with_logprobs=scores, emit=emit)
            return ModeScores(out.argmax[0], out.logprobs[0] if scores else None, out.logits[0] if logits else None)
        out = model.exit_stage(hidden, decode.heads(), backend)
        token, log_q = ops.acd_contrast(out, decode.alpha, decode.min_candidates, backend,
                                        with_logprobs=scores or logits, emit=emit)
        return ModeScores(token, log_q if scores else None, log_q if logits else None)

    def step(self, rows: Rows) -> None:
        """One token per row: the states at the heads' layers, the mode's scores, the choice, the step's end (in
        the last kernel when the engine allows it)."""
        states = {layer: rows.states(layer) for layer in self.stops}  # in depth order: blocks run once
        hidden = [states[layer] for layer in self.layers]
        if rows.sampling.controls_repetition:  # penalty and n-gram bans on the logits (ACD: log q), then the choice
            out = self.scores(hidden, rows.backend, logits=True)
            if rows.keep_logits:
                rows.keep(out.logits)
            scores = rows.penalize(out.logits)
            rows.emit(rows.choose(scores.argmax(dim=-1), scores))
            return
        io = rows.fused_emit()
        out = self.scores(hidden, rows.backend, scores=rows.sampling.do_sample, logits=rows.keep_logits, emit=io)
        if rows.keep_logits:
            rows.keep(out.logits)
        if io is None:
            rows.emit(rows.choose(out.token, out.scores))
