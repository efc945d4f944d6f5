"""What both engines share: one batch's decode state on the device and the `Rows` primitives that do not depend on
how rows are skipped.

The state (`StepIO`: tokens, positions, finished rows, the output columns, step index, cache slot, the next
input embedding) advances through the step epilogue op, so a step needs no host value on any engine: the eager
engine reads values when it chooses to (compaction, stopping), the static engine only at the points its schedule
names. Per-row exit state (`ExitState`, `PendingKV`) lives in `exits.py`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from mexit import ops
from mexit.decoding.sampling import SamplingConfig, choose
from mexit.decoding.stats import per_token, weight_reads
from mexit.decoding.step import Candidate
from mexit.ops import StepIO, probe_confidence, stop_ids

from .exits import ExitState, PendingKV

if TYPE_CHECKING:
    from mexit.decoding.prompts import PaddedBatch
    from mexit.model.decoder import KVCache, MultiExitGPT2


class DecodeState:
    """One batch of `rows` rows (padding rows included), `slots` cache slots and `steps` output columns, run by
    `mode` on `backend`. Subclasses say how blocks and heads run on rows that have left a step. predicated: the
    step runs as one predicated piece (the static engine with a mode that asks for it: skip flags on the device)."""

    engine = ""

    def __init__(self, model: MultiExitGPT2, backend: ops.Backend, mode, sampling: SamplingConfig, rows: int,
                 slots: int, steps: int, keep_logits: bool = False, predicated: bool = False):
        config, dev = model.config, model.device
        self.model, self.backend, self.mode, self.sampling, self.keep_logits = model, backend, mode, sampling, \
            keep_logits
        self.rows, self.steps = rows, steps
        self.cache = model.new_cache(rows, slots, check_states=True)
        long = dict(dtype=torch.long, device=dev)
        self.io = StepIO(tokens=torch.zeros(rows, **long), positions=torch.zeros(rows, **long),
                         finished=torch.zeros(rows, dtype=torch.bool, device=dev), eos=stop_ids(None, dev),
                         out=torch.zeros(rows, steps, **long), step=torch.zeros(1, **long),
                         slot=torch.zeros(1, **long), arrivals=torch.zeros(1, dtype=torch.int32, device=dev),
                         wte=model.w.wte, wpe=model.w.wpe, h0=torch.zeros(rows, config.n_embd, dtype=model.dtype,
                                                                          device=dev))
        self.uniform = torch.zeros(steps, rows, device=dev) if sampling.do_sample else None
        self.kept = torch.zeros(steps, rows, config.vocab_size, device=dev) if keep_logits else None
        # the repetition controls: each row's sequence by position (prompt, then output; no padding), a spare last
        # column taking the padding and any position past the batch's
        self.history = torch.zeros(rows, slots + 1, dtype=torch.long, device=dev) if sampling.controls_repetition \
            else None
        self.exits = None
        if mode.uses_exits:
            self.exits = ExitState.new(rows, steps, config.n_embd, mode.saved_layers, model.dtype, dev, predicated)
        self.counters: dict = {}
        self.pending: PendingKV | None = None
        self.layer, self.current, self.prefill_states = 0, None, None
        self.prompt_len = self.decoded = self.real_rows = self.max_new_tokens = 0
        self.eos = None
        self.buffers = mode.buffers(self)

    # ---- the batch's lifecycle ----
    def prefill(self, batch: PaddedBatch, real_rows: int, eos: int | None, max_new_tokens: int,
                uniform: torch.Tensor | None, thresholds: list[float] | None = None) -> None:
        """Start a batch (already padded to `rows`; rows past `real_rows` are padding, finished from the start):
        run the prompt through every layer the mode reads, and let the mode's step emit token 0. uniform:
        [real_rows, n] the rows' random streams (sampling); thresholds: the exit threshold of each step."""
        io, p = self.io, batch.ids.shape[1]
        self.prompt_len, self.real_rows, self.eos, self.max_new_tokens = p, real_rows, eos, max_new_tokens
        io.finished.copy_(torch.arange(self.rows, device=io.finished.device) >= real_rows)
        io.eos.copy_(stop_ids(eos))
        if eos is not None:  # columns not written yet read the first stop id (a round writes several at once)
            io.out[:, 1:] = eos[0]
        io.step.zero_()
        io.slot.fill_(p - 1)  # the step epilogue advances it to the first decode token's slot
        io.positions.copy_(batch.positions[:, -1])
        io.arrivals.zero_()
        if uniform is not None:
            n = min(uniform.shape[1], self.steps)
            self.uniform.zero_()
            self.uniform[:n, : uniform.shape[0]] = uniform[:, :n].T
        if self.exits is not None:
            self.exits.running.copy_(~io.finished)
            self.exits.exit_at.fill_(self.mode.depth)  # a token exits at the depth unless a check fires
            self.exits.thresholds[: len(thresholds)] = torch.tensor(thresholds, device=io.step.device)
            if self.exits.skip is not None:
                self.exits.skip.zero_()
        self.counters = dict(weight_reads(), kv_filled=0, host_reads=0, **self.engine_counters())
        if self.history is not None:
            self.history.zero_()
            spare = torch.full_like(batch.positions, self.history.shape[1] - 1)
            self.history[: batch.ids.shape[0]].scatter_(1, torch.where(batch.valid, batch.positions, spare), batch.ids)
        h, states = self.model.forward(batch.ids, [layer for layer in self.mode.stops if layer], batch.valid,
                                       self.cache, self.backend)
        self.prefill_states = {0: h[:, -1], **{layer: x[:, -1] for layer, x in states.items()}}
        self.start_step()
        self.mode.run(self)
        self.mode.start(self, uniform)
        self.prefill_states = None
        if self.exits is not None and self.tests_first:
            self.arm()
        self.decoded = 0

    def start_step(self) -> None:
        """Before a step's pieces run (the prefill's too): the host's view of it."""
        self.layer, self.deepest = 0, 0

    @property
    def prefilling(self) -> bool:
        """The prompt's step: its states are computed; the weight-read counters cover decode steps only."""
        return self.prefill_states is not None

    def engine_counters(self) -> dict:
        """The engine's own counters (besides the weight reads)."""
        return {}

    def advance(self) -> None:
        """One decode step, and its weight reads where the host sees them."""
        self.start_step()
        self.run_step()
        self.counters["steps"] += 1
        self.decoded += 1

    def run_step(self) -> None:
        self.mode.run(self)

    def read(self, tensor: torch.Tensor) -> list:
        """A device-to-host read: the host waits for the device (counted outside the prompt's step)."""
        self.counters["host_reads"] += not self.prefilling
        return tensor.tolist()

    def finished(self) -> bool:
        """Whether every row has finished (a host read)."""
        return self.read(self.io.finished.all())

    def describe(self, result) -> None:
        """Per-token exit layers and confidences (early exit) and the statistics, onto a GenerationResult."""
        stats = dict(self.counters)
        if self.exits is not None:
            lengths = [len(t) for t in result.tokens]
            produced = max(lengths)
            exit_at = self.exits.exit_at[: self.real_rows, :produced].tolist()
            conf_at = self.exits.conf_at[: self.real_rows, :produced].tolist()
            result.exit_layers = [row[:n] for row, n in zip(exit_at, lengths)]
            result.confidences = [row[:n] for row, n in zip(conf_at, lengths)]
            stats.update(depth=self.mode.depth,
                         mean_exit_layer=sum(map(sum, result.exit_layers)) / max(sum(lengths), 1))
        if self.pending is not None:  # deferred keys/values no later token needed (filled if the cache is returned)
            stats["kv_owed"] = self.pending.owed()
        result.stats = stats
        self.mode.describe(self, result)
        config, dtype = self.model.config, self.model.dtype
        decoded = stats["steps"] if self.mode.emits_one_per_step else sum(map(len, result.tokens)) / self.real_rows - 1
        stats.update(per_token(stats, config, dtype, decoded, *self.mode.reference(config)))

    def nonfinite(self, lengths: list[int]) -> dict[int, int]:
        """{row: the first output token (0-based) whose step computed a state holding NaN or inf} over the rows'
        `lengths` output tokens (one host read, at the end of a generation). Token j of a row comes from the state
        of its (prompt length + j)-th token in the cache's valid slots (a rejected draft's slot is not valid, so a
        draft's overflow is not a token's); a non-finite prompt state is token 0's."""
        c = self.cache
        if c.health is None:
            return {}
        health, valid = c.health[: self.real_rows], c.valid[: self.real_rows]
        bad = health.isnan() & valid
        token = valid.long().cumsum(-1) - valid[:, : self.prompt_len].sum(-1, keepdim=True)  # prompt's last: 0
        first = self.read(torch.where(bad, token.clamp(min=0), 2**62).min(-1).values)
        return {row: j for row, (j, n) in enumerate(zip(first, lengths)) if j < n}

    def returned_cache(self) -> KVCache:
        """The cache of the real rows (owed keys/values filled), for inspection."""
        if self.pending is not None:
            self.pending.flush()
        c, n = self.cache, self.real_rows
        return dataclasses.replace(c, k=c.k[:, :n].clone(), v=c.v[:, :n].clone(), valid=c.valid[:n].clone(),
                                   health=None if c.health is None else c.health[:n].clone())

    # ---- Rows primitives shared by both engines ----
    def uniform_now(self) -> torch.Tensor | None:
        """This step's uniform numbers [rows] (sampling), read on the device at the step index."""
        return self.uniform.index_select(0, self.io.step)[0] if self.uniform is not None else None

    def choose(self, greedy: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        return choose(greedy, scores, self.sampling, self.uniform_now())

    def emit(self, token: torch.Tensor) -> None:
        ops.step_epilogue(token, self.io, self.backend)
        if self.history is not None:  # the emitted token at its position (a finished row's may be -1: no matter)
            self.remember(self.io.tokens, self.io.positions)

    def fill_kv(self, hidden: torch.Tensor, first: int, end: int, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """State propagation of blocks first..end-1 for positions (rows[i], slots[i]) exited at hidden [n, d]
        (`MultiExitGPT2.fill_kv`), counted in the weight reads and the keys/values filled."""
        self.model.fill_kv(hidden, first, end, self.cache, rows, slots, self.backend)
        self.counters["weight_fill_blocks"] += end - first
        self.counters["kv_filled"] += len(rows) * (end - first)

    def feed(self, tokens: torch.Tensor, offset: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        io, model = self.io, self.model
        slot = io.slot + offset
        positions = (io.positions + offset).clamp(max=model.config.n_positions - 1)
        self.cache.mark(slot)
        return model.run_to(model.embed(tokens[:, None], positions[:, None]), layers, self.cache, slot, self.backend)

    def run_round(self, h: torch.Tensor, start: int, layers: list[int]) -> dict[int, torch.Tensor]:
        return self.model.run_to(h, layers, self.cache, self.io.slot, self.backend, start=start)

    def emit_round(self, accepted: torch.Tensor, token: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor,
                   draft_i: torch.Tensor, count: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        if self.history is not None:  # the target's token follows the accepted drafts
            self.remember(token, self.io.positions + accepted + 1)
        return ops.round_epilogue(accepted, token, drafts, n_drafts, draft_i, count, drafted, self.io,
                                  self.cache.valid, self.max_new_tokens, self.backend)

    def remember(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Write tokens [B] at positions [B] of the rows' sequences (the repetition controls' history)."""
        spare = self.history.shape[1] - 1
        self.history.scatter_(1, positions.clamp(max=spare)[:, None], tokens.clamp(min=0)[:, None])

    def penalize(self, scores: torch.Tensor, last: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """The mode's scores after the repetition controls (`ops.control_repetition`; unchanged without them). scores:
        [B, V] at each row's last position (`last` None), [B, V] with last [B] or [B, J, V] with last [B, J] (the
        positions they follow); rows [n] int64: scores [n, V] of those rows only."""
        if self.history is None:
            return scores
        history = self.history if rows is None else self.history[rows]
        if last is None:
            last = self.io.positions if rows is None else self.io.positions[rows]
        s = self.sampling
        return ops.control_repetition(scores, history, last.clamp(max=self.history.shape[1] - 2),
                                      s.repetition_penalty, s.no_repeat_ngram_size, self.backend)

    def fused_emit(self) -> StepIO | None:
        """Greedy steps end in the kernel that picks the token (triton backend; not with a repetition penalty)."""
        return self.io if (self.backend.triton and not self.sampling.do_sample and not self.keep_logits
                           and not self.sampling.controls_repetition) else None

    def keep(self, logits: torch.Tensor) -> None:
        self.kept.index_copy_(0, self.io.step, logits[None].float())

    @property
    def tests_first(self) -> bool:
        """Whether a check tests before it decides: on the torch backend a decode step's check is its confidence
        (`test`), compared with the rows' thresholds where the host reads it (`test_outcome`), and the decision's
        bookkeeping (`commit`) runs only when a row fires, so a check that does not fire costs what it reads; the
        triton backend decides in one kernel."""
        return self.prefill_states is None and not self.backend.triton

    def decide(self, layer: int, confidence: torch.Tensor | None, token: torch.Tensor | None, hidden: torch.Tensor,
               probe: tuple | None = None) -> None:
        x = self.exits
        if self.tests_first:
            self.test(confidence, token, hidden, probe)
            return
        ops.exit_decide(layer, x.predicted if confidence is None else confidence, x.thresholds, self.io.step,
                        x.running, x.fired, token, x.chosen, hidden, x.h_exit, x.exit_at, x.conf_at, x.flags,
                        self.backend, x.skip, x.fired_skip, arrivals=self.io.arrivals, probe=probe)

    def test(self, confidence: torch.Tensor | None, token: torch.Tensor | None, hidden: torch.Tensor,
             probe: tuple | None) -> None:
        """A check's test (torch backend): the confidence (a probe's from hidden) and the token kept for `commit`;
        the comparison with the rows' thresholds (`arm`) happens where the host reads them (`test_outcome`).
        Nothing else changes."""
        x = self.exits
        if probe is not None:
            probe_confidence(hidden, *probe, out=x.predicted)
        else:
            x.predicted.copy_(confidence)
        if token is not None:
            x.candidate.copy_(token)

    def test_outcome(self) -> tuple[list[bool], list[bool]]:
        """The last test's (fired, running) per row: one host read of the confidences and the rows' thresholds."""
        return self.exits.outcome(self.read(self.exits.tested))

    def arm(self) -> None:
        """The tests' per-row thresholds for this step: its threshold where a row runs, +inf elsewhere (after the
        prompt's step, each step's end and each commit: where `running` or the step changes)."""
        x = self.exits
        x.row_threshold.copy_(torch.where(x.running, x.thresholds.index_select(0, self.io.step), torch.inf))

    def commit(self, layer: int, hidden: torch.Tensor, token: bool) -> None:
        """After a test where some row fired: the decision's bookkeeping (`exit_decide` on the tested confidences;
        token: whether the test kept the exit's tokens; hidden [B, d]: the states at `layer`)."""
        x = self.exits
        ops.exit_decide(layer, x.predicted, x.thresholds, self.io.step, x.running, x.fired,
                        x.candidate if token else None, x.chosen, hidden, x.h_exit, x.exit_at, x.conf_at, x.flags,
                        self.backend, x.skip, x.fired_skip, arrivals=self.io.arrivals)
        self.arm()

    def decide_final(self, layer: int, confidence: torch.Tensor | None, token: torch.Tensor | None) -> None:
        """Every running row exits at `layer` (the depth) with `token`; the chosen tokens end the step. On the torch
        backend in fewer operations than `exit_decide_ref`'s final decision, with the same outcome: exit_at holds
        the depth from the prompt's step on (a check that fires writes its layer), so only the tokens and the
        confidences of the running rows are written, then the emit and the next step's rows."""
        x = self.exits
        if not self.tests_first:
            ops.exit_decide(layer, x.no_confidence if confidence is None else confidence, x.thresholds, self.io.step,
                            x.running, x.fired, token, x.chosen, None, x.h_exit, x.exit_at, x.conf_at, x.flags,
                            self.backend, x.skip, x.fired_skip, final=True, emit=self.io, arrivals=self.io.arrivals)
            if self.history is not None:
                self.remember(self.io.tokens, self.io.positions)
            return
        if token is not None:  # None: every row has left the step (`chosen` holds their tokens)
            torch.where(x.running, token, x.chosen, out=x.chosen)
            step = self.io.step
            column = x.conf_at.index_select(1, step).squeeze(1)
            x.conf_at.index_copy_(1, step, torch.where(x.running, confidence, column).unsqueeze(1))
        self.emit(x.chosen)
        torch.logical_not(self.io.finished, out=x.running)
        x.h_exit.copy_(self.io.h0)
        self.arm()

    def save(self, layer: int, hidden: torch.Tensor) -> None:
        self.exits.saved[layer].copy_(hidden)

    def saved(self, layer: int) -> torch.Tensor:
        return self.exits.saved[layer]

    def head_out(self, hidden: torch.Tensor, head, skip: torch.Tensor | None = None):
        """The exit stage of one head over rows hidden [n, d] (softmax statistics; log-probabilities to sample)."""
        return self.model.exit_stage([hidden], [head], self.backend, with_logprobs=self.sampling.do_sample, skip=skip)

    def verdict(self, out, uniform: torch.Tensor | None, rows: torch.Tensor | None = None) -> Candidate:
        """A head's output as a Candidate: the sampler's token with `uniform` (one per row of out: every row, or
        `rows`). With the repetition controls, token and confidence come from the controlled logits."""
        if self.history is not None:
            scores = self.penalize(out.logits[0], rows=rows)
            top2 = scores.softmax(-1).topk(2, dim=-1).values
            return Candidate(choose(scores.argmax(-1), scores, self.sampling, uniform), top2[:, 0],
                             top2[:, 0] - top2[:, 1])
        scores = out.logprobs[0] if out.logprobs is not None else None
        return Candidate(choose(out.argmax[0], scores, self.sampling, uniform), out.max_prob[0], out.margin[0])
