"""Confidence-gated early exit (CALM, Schuster et al. 2022) with state propagation that keeps the KV cache
consistent.

Per token, the layers run in segments between the checked exits. At each checked exit every still-running row
measures its confidence; rows at or above the threshold take their token from that exit's head and stop. Every
skipped block j still needs keys/values at that position for later tokens: state propagation computes them from
the exited hidden state, K_j, V_j = c_attn_j(ln_1_j(h_exit))[k, v] (CALM, Schuster et al. 2022), at once (eager) or
right before a later token runs block j (deferred). How is the engine's business: the eager engine fills the
exited rows' blocks, the static engine runs frozen rows through the blocks (their key/value writes are the
propagation) and fills the rest once no row runs. The prefill decides token 0 on states of every layer.

With the repetition controls (`ops.control_repetition`), a head's token and its max-prob / margin confidence come from
its logits after them, on the row's sequence so far: the distribution the token is chosen from.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F

from mexit.values import plain_fields

from .step import Mode, Rows

if TYPE_CHECKING:
    from mexit.model.config import ModelConfig
    from mexit.model.decoder import MultiExitGPT2

MEASURES = ("max-prob", "margin", "cosine", "learned")
HEAD_FREE = ("cosine", "learned")  # measures that decide without a head: it runs for the rows that fire
PROPAGATION = ("eager", "deferred")
SCHEDULES = ("segments", "predicated")


@dataclass(frozen=True)
class ExitPolicy:
    """When a token may stop.

    measure: "max-prob" (max softmax probability of the exit's head, CALM's default), "margin" (top-1 minus top-2
    probability), "cosine" (cosine similarity of the hidden states at this checked exit and the previous one) or
    "learned" (the checkpoint's learned exit predictor: the probability that the exit agrees with the final head,
    `mexit.model.predictors`); the last two decide without reading a head. threshold: exit when confidence >=
    threshold ([0, 1]; [-1, 1] for cosine). decay_tau: CALM's decaying threshold 0.9*T + 0.1*T*exp(-tau*t/N) with N
    = max_steps (default the generation length). exits: checked exit layers (default: all of the checkpoint's below
    the final head's depth), min_layer: no exit below it. final_head: the head of tokens that never exit ("original"
    or an exit layer, which then sets the depth). propagation: "eager" or "deferred". schedule (the static and graph
    engines): "segments" (a graph per segment between checked exits, one flag read per check) or "predicated" (the
    whole step one graph; kernels after the exit read a device flag and return; needs the triton backend and eager
    propagation). Both give the same tokens, exits and cache."""

    threshold: float
    measure: str = "max-prob"
    exits: tuple[int, ...] | None = None
    min_layer: int = 1
    decay_tau: float | None = None
    max_steps: int | None = None
    final_head: int | str = "original"
    propagation: str = "eager"
    schedule: str = "segments"

    def __post_init__(self):
        plain_fields(self)
        if self.measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {self.measure!r}; use one of {MEASURES}")
        low = -1.0 if self.measure == "cosine" else 0.0
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number, got {self.threshold!r} ({type(self.threshold).__name__})")
        if not low <= self.threshold <= 1.0:
            raise ValueError(f"threshold for {self.measure} must be in [{low:g}, 1], got {self.threshold}")
        if self.exits is not None and (isinstance(self.exits, (str, bytes)) or not hasattr(self.exits, "__iter__")):
            raise ValueError(f"exits is a list of exit layers (or None: every exit), got {self.exits!r}")
        layers = ([] if self.exits is None else list(self.exits)) + [self.min_layer] + (
            [] if self.final_head == "original" else [self.final_head])
        odd = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
        if odd:
            raise ValueError(f"exit layers, min_layer and final_head are integers (final_head also 'original'), got "
                             f"{odd[0]!r} ({type(odd[0]).__name__})")
        if self.exits is not None and len(set(self.exits)) != len(self.exits):
            raise ValueError(f"exits lists a layer twice: {list(self.exits)}")
        if self.decay_tau is not None and not 0 <= self.decay_tau < math.inf:
            raise ValueError(f"decay_tau must be a finite number >= 0, got {self.decay_tau}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.propagation not in PROPAGATION:
            raise ValueError(f"unknown propagation {self.propagation!r}; use one of {PROPAGATION}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        if self.schedule == "predicated" and self.propagation != "eager":
            raise ValueError("the predicated schedule propagates states inside each skipped block (eager); "
                             "deferred propagation needs schedule='segments'")
        if self.min_layer < 1:
            raise ValueError(f"min_layer must be >= 1, got {self.min_layer}")

    def check_engine(self, engine: str, backend: str) -> None:
        """The predicated schedule is the static / graph engines' (the eager engine compacts rows instead), and its
        kernels read device flags: it needs triton. ValueError naming what to change."""
        if self.schedule == "predicated" and engine == "eager":
            raise ValueError("schedule='predicated' is a static-engine schedule: use engine='static' or 'graph' (the "
                             "eager engine runs the reference scheduler, schedule='segments')")
        if self.schedule == "predicated" and engine in ("static", "graph") and backend != "triton":
            raise ValueError(f"the predicated early-exit schedule needs backend='triton' (its kernels read the skip "
                             f"flag), got {backend!r}; use schedule='segments' with the torch backend")

    def depth(self, config: ModelConfig) -> int:
        return config.n_layer if self.final_head == "original" else int(self.final_head)

    def check(self, config: ModelConfig) -> None:
        """Against a checkpoint (ValueError): the final head and exits exist, some exit is checked
        (`checked_exits`)."""
        self.checked_exits(config)

    def checked_exits(self, config: ModelConfig) -> list[int]:
        """The exits checked, validated against the checkpoint: below the depth, at or above min_layer."""
        if self.final_head != "original" and self.final_head not in config.exit_layers:
            raise ValueError(f"final head {self.final_head} is not an exit of this checkpoint "
                             f"({list(config.exit_layers) or 'none'})")
        exits = config.exit_layers if self.exits is None else tuple(self.exits)
        missing = sorted(set(exits) - set(config.exit_layers))
        if missing:
            raise ValueError(f"exit layers {missing} are not in this checkpoint; its exits are "
                             f"{list(config.exit_layers) or 'none'}")
        if self.min_layer > config.n_layer:
            raise ValueError(f"min_layer {self.min_layer} is above the model's {config.n_layer} layers")
        checked = sorted(layer for layer in set(exits) if self.min_layer <= layer < self.depth(config))
        if not checked:
            raise ValueError(f"no exit to check: exits {list(exits)} with min_layer {self.min_layer} leave none below "
                             f"depth {self.depth(config)}")
        unchecked = sorted(set(exits) - set(checked))
        if self.exits is not None and unchecked:  # named ones are checked or refused, never dropped
            raise ValueError(f"exits {unchecked} would not be checked: an exit is checked at or above min_layer "
                             f"{self.min_layer} and below the final head's depth {self.depth(config)} (where every "
                             "row stops); leave them out")
        return checked

    def previous_layers(self, config: ModelConfig) -> dict[int, int]:
        """{checked exit: the layer cosine compares it with}: the previous checked exit; for the first one the
        checkpoint exit below it, or 0 (the embeddings)."""
        checked = self.checked_exits(config)
        below = [layer for layer in config.exit_layers if layer < checked[0]]
        return dict(zip(checked, [below[-1] if below else 0] + checked[:-1]))

    def threshold_at(self, step: int, n_steps: int) -> float:
        """CALM: lambda_t = 0.9*lambda + 0.1*lambda*exp(-tau*t/N); the plain threshold without decay_tau."""
        if self.decay_tau is None:
            return self.threshold
        n = self.max_steps or n_steps
        return 0.9 * self.threshold + 0.1 * self.threshold * math.exp(-self.decay_tau * step / n)


class EarlyExit(Mode):
    """The decode step of an ExitPolicy: segments of blocks between the stops (checked exits, the final depth and,
    for cosine, the layers compared with), a decision at each checked exit, the final head for rows still
    running. Each segment is a piece (a CUDA graph on the graph engine); after a check the engine says whether a
    row still runs, and if none does the step ends there. A head-free measure (cosine, learned) decides first; the
    exit's head then runs once for the rows that fired (`fired_head` piece)."""

    uses_exits = True
    full_heads = 1  # full depth: the final head

    def __init__(self, model: MultiExitGPT2, policy: ExitPolicy):
        config = model.config
        self.model, self.policy = model, policy
        self.settings = policy
        self.depth = policy.depth(config)
        self.checked = policy.checked_exits(config)
        self.previous = policy.previous_layers(config)
        self.final_head = policy.final_head
        self.cosine = policy.measure == "cosine"
        self.head_free = policy.measure in HEAD_FREE
        self.predictors = check_predictors(model, policy, self.checked) if policy.measure == "learned" else None
        self.reads_predictors = self.predictors is not None
        self.defers_propagation = policy.propagation == "deferred"
        self.predicated = policy.schedule == "predicated"
        self.probes = {layer: self.predictors.probe(layer) for layer in self.checked} if self.predictors else {}
        self.saved_layers = set(self.previous.values()) if self.cosine else set()
        self.stops = sorted({self.depth, *self.checked, *self.saved_layers} - {0})

    def thresholds(self, max_new_tokens: int) -> list[float]:
        return [self.policy.threshold_at(i, max_new_tokens) for i in range(max_new_tokens)]

    def reference(self, config) -> tuple[int, int]:
        """Full depth of the policy's final head (the original head's: the full model, by default)."""
        return self.depth, 1

    def segment(self, rows: Rows, index: int) -> None:
        """Blocks up to stop `index`, then that stop's check (or the final head, which ends the step)."""
        layer = self.stops[index]
        if index == 0 and 0 in self.saved_layers:
            rows.save(0, rows.states(0))
        h = rows.states(layer)
        if layer in self.saved_layers:
            rows.save(layer, h)
        if layer == self.depth:
            verdict = rows.candidate(h, self.final_head)
            rows.decide_final(layer, verdict.max_prob, verdict.token)
        elif layer in self.checked:
            if self.cosine:
                rows.decide(layer, F.cosine_similarity(h.float(), rows.saved(self.previous[layer]).float(), dim=-1),
                            None, h)
            elif self.predictors is not None:
                rows.decide(layer, None, None, h, probe=self.probes[layer])
            else:
                verdict = rows.candidate(h, layer)
                confidence = verdict.max_prob if self.policy.measure == "max-prob" else verdict.margin
                rows.decide(layer, confidence, verdict.token, h)

    def pieces(self, rows: Rows) -> dict:
        """The step's pieces by key (the engine adds the pieces that end a step early)."""
        pieces = {("segment", i): functools.partial(self.segment, rows, i) for i in range(len(self.stops))}
        if self.head_free:
            pieces.update({("fired_head", layer): functools.partial(rows.fired_token, layer)
                           for layer in self.checked})
        return pieces

    def run(self, rows: Rows) -> None:
        """One step: segment by segment until no row runs."""
        for index, layer in enumerate(self.stops):
            rows.launch(("segment", index), functools.partial(self.segment, rows, index))
            if layer not in self.checked:
                continue
            if self.head_free and rows.any_fired():
                rows.launch(("fired_head", layer), functools.partial(rows.fired_token, layer))
            if not rows.any_running():
                rows.end_early(layer)
                return


def check_predictors(model: MultiExitGPT2, policy: ExitPolicy, checked: list[int]):
    """The checkpoint's learned predictors for `checked`, trained against the policy's final head."""
    predictors = model.predictors
    if predictors is None:
        raise ValueError("measure 'learned' needs the checkpoint's exit predictors (exit_predictors.safetensors): "
                         "train them with `mexit train-exit-predictors --model FOLDER --data TEXT`")
    missing = sorted(set(checked) - set(predictors.layers))
    if missing:
        raise ValueError(f"measure 'learned': no exit predictor for exits {missing}; this checkpoint has them for "
                         f"{list(predictors.layers)} (pass exits=... or train the others)")
    if str(predictors.final_head) != str(policy.final_head):
        raise ValueError(f"measure 'learned': the predictors learned agreement with the {predictors.final_head!r} "
                         f"head, the policy's final head is {policy.final_head!r}")
    return predictors
