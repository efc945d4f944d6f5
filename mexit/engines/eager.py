"""The eager engine: exact shapes (no buckets), host control, and row compaction: blocks and heads run only for
the rows still running in a step; an exited row's skipped blocks get their keys/values by state propagation (at
once, or deferred until a later token runs them). The reference every other engine is tested against."""

from __future__ import annotations

import torch

from mexit import ops
from mexit.decoding.prompts import left_pad
from mexit.decoding.step import Candidate

from .base import DecodeState
from .exits import PendingKV

CHECK_EVERY = 1  # steps between the loop's all-finished checks


class EagerState(DecodeState):
    engine = "eager"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.live: torch.Tensor | None = None  # int64 indices of the running rows; None: every row (fixed modes)
        self.no_rows = torch.zeros(0, dtype=torch.long, device=self.model.device)
        self.fired_rows = self.no_rows
        self.slot = 0
        if self.exits is not None and self.mode.defers_propagation:
            self.pending = PendingKV(self.fill_kv, self.mode.depth)

    def engine_counters(self) -> dict:
        return dict(blocks_run=0, head_rows=0, checks=0) if self.exits is not None else {}

    def start_step(self) -> None:
        super().start_step()
        if not self.prefilling:
            self.slot = self.prompt_len + self.decoded  # this step's token's cache slot
            self.current = self.io.h0
        if self.exits is not None:
            self.live = self.exits.running.nonzero()[:, 0]
            self.fired_rows = self.no_rows

    def launch(self, key, fn) -> None:
        fn()

    def states(self, layer: int) -> torch.Tensor:
        if self.prefilling:
            return self.prefill_states[layer]
        if layer > self.layer:
            if self.layer == 0:  # the step's token is a key from now on (its attention marks it too)
                self.cache.mark(self.slot)
            live = self.live
            if live is None or len(live):
                if self.pending is not None:
                    self.pending.fill(self.layer, layer)
                every = live is None or len(live) == self.rows
                h = self.current if every else self.current[live]
                h = self.model.run_layers(h[:, None], self.layer, layer, self.cache, self.slot, self.backend,
                                          rows=None if every else live,
                                          check=self.exits is None or layer == self.mode.depth)[:, 0]
                self.current = h if every else self.current.index_copy(0, live, h)
                if self.exits is not None:
                    self.counters["blocks_run"] += (layer - self.layer) * len(live)
                self.deepest = layer
            self.layer = layer
        return self.current

    def run_step(self) -> None:
        super().run_step()
        if self.exits is not None:
            self.counters["weight_blocks"] += self.deepest

    def candidate(self, hidden: torch.Tensor, head) -> Candidate:
        live = self.live
        uniform = self.uniform_now()
        self.count_head(len(live))
        if len(live) == self.rows:  # every row runs: no gather, no scatter
            return self.verdict(self.head_out(hidden, head), uniform)
        verdict = self.verdict(self.head_out(hidden[live], head), None if uniform is None else uniform[live], live)
        return Candidate(*(torch.zeros(self.rows, dtype=t.dtype, device=t.device).index_copy(0, live, t)
                           for t in verdict))

    def count_head(self, rows: int) -> None:
        self.counters["head_rows"] += rows
        self.counters["weight_heads"] += not self.prefilling

    def decide(self, layer: int, confidence: torch.Tensor | None, token: torch.Tensor | None, hidden: torch.Tensor,
               probe: tuple | None = None) -> None:
        self.counters["checks"] += len(self.live)
        self.counters["weight_predictors"] += probe is not None and not self.prefilling
        super().decide(layer, confidence, token, hidden, probe)
        x = self.exits
        if self.tests_first:
            if not any(self.test_outcome()[0]):
                self.fired_rows = self.no_rows
                return
            self.commit(layer, hidden, token is not None)
        fired = self.fired_rows = x.fired.nonzero()[:, 0]
        if not len(fired):
            return
        self.live = x.running.nonzero()[:, 0]
        if self.prefilling:
            return
        c = self.cache  # the fired rows' states end here: their check (the running rows' at the depth)
        ops.check_states(hidden[fired][:, None], c.health, c.valid, self.slot, fired, self.backend)
        slots = torch.full_like(fired, self.slot)
        if self.pending is not None:
            self.pending.add(fired, slots, hidden[fired], layer)
            return
        self.fill_kv(hidden[fired], layer, self.mode.depth, fired, slots)

    def fired_token(self, head) -> None:
        rows, x = self.fired_rows, self.exits
        uniform = self.uniform_now()
        verdict = self.verdict(self.head_out(x.h_exit[rows], head), None if uniform is None else uniform[rows], rows)
        x.chosen.index_copy_(0, rows, verdict.token)
        self.count_head(len(rows))

    def any_running(self) -> bool:
        return len(self.live) > 0

    def any_fired(self) -> bool:
        return len(self.fired_rows) > 0

    def end_early(self, layer: int) -> None:
        """Every row has exited (and been propagated): end the step with the chosen tokens."""
        self.decide_final(self.mode.depth, None, None)


class EagerEngine:
    """Starts batches on the eager engine (nothing is kept between calls)."""

    name = "eager"
    check_every = CHECK_EVERY

    def start(self, model, backend, mode, spec, prompts: list[list[int]], sampling, eos, max_new_tokens: int,
              uniform, thresholds, keep_logits: bool = False) -> EagerState:
        batch = left_pad(prompts, model.device)
        state = EagerState(model, backend, mode, sampling, len(prompts), mode.slots(batch.ids.shape[1],
                           max_new_tokens), mode.columns(max_new_tokens), keep_logits)
        state.prefill(batch, len(prompts), eos, max_new_tokens, uniform, thresholds)
        return state
