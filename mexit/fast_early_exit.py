"""Early exit on the fast path: a decode step split into static segments between the checked exits.

All rows of the bucket run every launched segment (static shapes, so each segment can be a CUDA graph). A row
that has exited is predicated, not removed: each later block reads its frozen exit state h_exit as input, so
the block's key/value write for that row is exactly state propagation, c_attn_j(ln_1_j(h_exit)), and its
other outputs are ignored. In the memory-bound regime that costs no extra weight reads. After each checked
exit the host reads one flag (is any row still running?); when none is, the rest of the step's layers are
skipped and one fill step writes their keys/values from h_exit (eager propagation, 2·d² of each block's 12·d²
weights), or, with propagation="deferred", the step is recorded as pending and its keys/values are filled, in
one batched fill for all pending steps, right before the next segment that runs those blocks (for a run of
shallow tokens: never during generation). So a step reads at most one small value per checked exit and launches
only the layers some row needs.

On the triton backend (up to `fused_max_rows` rows) the predication lives in the kernels: the residual kernels of
each block pass a frozen row's state through unchanged (`live` = running), the last layer's decision kernel ends
the step (`kernels/step_epilogue.py`: the token, the next input, and the next step's running rows, frozen states
and skip flag), so a step launches 5 kernels per block, 3 per checked exit (head, merge, decision) and 3 at the
end, and no torch operation (the cosine measure, sampling and deferred propagation add theirs).

`PredicatedEarlyExit` is the other schedule: the whole step as one piece with no host read, the kernels past the
exit reading a device flag instead (see its docstring). `ExitPolicy.schedule` picks; both give the same result.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mexit.kernels.exit_decide_ref import exit_decide_ref

from .early_exit import weight_reads
from .heads import exit_stage
from .model import MultiExitGPT2
from .static_state import StaticBuffers, StepKey, compiled


class StaticEarlyExit(StaticBuffers):
    """The segment steps of one exit policy, batch bucket and length bucket, over static buffers."""

    def __init__(self, model: MultiExitGPT2, key: StepKey, backend: str, compile_layers: bool = False):
        super().__init__(model, key, backend)
        self.policy = key.mode
        config = model.config
        self.depth = self.policy.depth(config)
        self.checked = self.policy.checked_exits(config)
        self.previous = self.policy.previous_layers(config)
        cosine = self.policy.measure == "cosine"
        self.stops = sorted({self.depth, *self.checked, *(self.previous.values() if cosine else ())} - {0})
        dev, b, t, d = model.device, key.batch, key.length, config.n_embd
        zeros = dict(device=dev)
        self.exit_at = torch.zeros(b, t, dtype=torch.long, **zeros)
        self.conf_at = torch.zeros(b, t, dtype=torch.float32, **zeros)
        self.thresholds = torch.zeros(t, dtype=torch.float32, **zeros)
        self.running = torch.zeros(b, dtype=torch.bool, **zeros)
        self.fired = torch.zeros(b, dtype=torch.bool, **zeros)
        self.flags = torch.zeros(2, dtype=torch.bool, **zeros)  # any row fired, any row still running
        self.chosen = torch.zeros(b, dtype=torch.long, **zeros)
        self.no_confidence = torch.zeros(b, dtype=torch.float32, **zeros)  # the step end's decision reads none
        self.rows = torch.arange(b, **zeros)
        self.h = torch.zeros(b, 1, d, dtype=model.dtype, **zeros)
        self.h_exit = torch.zeros(b, d, dtype=model.dtype, **zeros)
        self.deferred = self.policy.propagation == "deferred"
        self.h_pending = torch.zeros(b, t, d, dtype=model.dtype, **zeros) if self.deferred else None
        self.pending: list[list[int]] = []  # [slot, next block to fill] of steps whose upper blocks were skipped
        self.host_slot = 0
        self.saved = {layer: torch.zeros(b, d, dtype=model.dtype, **zeros)  # cosine's previous states
                      for layer in (set(self.previous.values()) if cosine else ())}
        self.skip = self.cosine_skip = None  # device flags of the predicated schedule
        starts = [0] + self.stops[:-1]
        self.blocks = [functools.partial(self._run_blocks, a, b) for a, b in zip(starts, self.stops)]
        if compile_layers:
            self.blocks = [compiled(fn) for fn in self.blocks]
        self.counters = dict(segments=0, fills=0, host_reads=0, **weight_reads())

    # ---- pieces shared by the prefill (precomputed states) and the segments ----
    def _pick(self, out) -> torch.Tensor:
        return self.pick(out.argmax[0], out.logprobs[0] if out.logprobs is not None else None)

    def _head(self, hidden: torch.Tensor, head, skip=None):
        return exit_stage(self.model, [hidden], [head], self.backend, with_logprobs=self.key.do_sample, skip=skip,
                          pdl=self.pdl)

    def _decide(self, layer: int, confidence, candidate, h_last, final: bool = False, emit: bool = False) -> None:
        """The decision at `layer` and its bookkeeping (`exit_decide_ref`); one kernel on the triton backend. emit:
        the decision also ends the decode step and sets the next one up."""
        if self.backend == "triton":
            from mexit.kernels.exit_decide import exit_decide

            decide = functools.partial(exit_decide, arrivals=self.io.arrivals, pdl=self.pdl)
        else:
            decide = exit_decide_ref
        decide(layer, confidence, self.thresholds, self.step_index, self.running, self.fired, candidate, self.chosen,
               h_last, self.h_exit, self.exit_at, self.conf_at, self.flags, self.skip, self.cosine_skip, final=final,
               emit=self.io if emit else None)

    def _check(self, layer: int, h_last: torch.Tensor) -> None:
        """Confidence at a checked exit for the running rows; firing rows freeze and (except for cosine, whose
        head runs in `_cosine_head` only when a row fired) take this exit's token."""
        if self.policy.measure == "cosine":
            confidence = F.cosine_similarity(h_last.float(), self.saved[self.previous[layer]].float(), dim=-1)
            candidate = None
        else:
            out = self._head(h_last, layer, self.skip)
            confidence = (out.max_prob if self.policy.measure == "max-prob" else out.margin)[0]
            candidate = self._pick(out)
        self._decide(layer, confidence, candidate, h_last)

    def _cosine_head(self, layer: int) -> None:
        out = self._head(self.h_exit, layer, self.cosine_skip)
        self.chosen.copy_(torch.where(self.fired, self._pick(out), self.chosen))

    def _final(self, h_last: torch.Tensor, emit: bool) -> None:
        """The last layer: every row still running takes the final head's token; emit: the step ends here."""
        out = self._head(h_last, self.policy.final_head, self.skip)
        self._decide(self.depth, out.max_prob[0], self._pick(out), None, final=True, emit=emit)

    # ---- decode-step pieces (each one a CUDA graph on the graph engine) ----
    def _segment(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Blocks up to stop `index` from h [B, 1, d], then that stop's check (or the final head, which ends the
        step). Returns the stop's states [B, 1, d]."""
        layer = self.stops[index]
        if index == 0 and not self.fused:  # the torch attention reads the slot's validity (the kernel marks it)
            self.cache.valid.index_fill_(1, self.slot, True)
        if index == 0 and 0 in self.saved:
            self.saved[0].copy_(h[:, 0])
        h = self.blocks[index](h)
        if layer in self.saved:
            self.saved[layer].copy_(h[:, -1])
        if layer == self.depth:
            self._final(h[:, -1], emit=True)
        elif layer in self.checked:
            self._check(layer, h[:, -1])
        return h

    def _segment_piece(self, index: int) -> None:
        """Segment `index` between static buffers: from the step's input or the states the last one left."""
        h = self._segment(index, self.h0[:, None] if index == 0 else self.h)
        if self.stops[index] != self.depth:
            self.h.copy_(h)

    def _run_blocks(self, start: int, end: int, h: torch.Tensor) -> torch.Tensor:
        """Blocks start..end-1 for every row; rows no longer running feed their frozen exit state (predication):
        inside the kernels (`live`) on the fused path, a torch where per block otherwise. A lone row on the
        segment schedule needs none: a segment runs only while it runs (or after it finished, when its outputs are
        masked anyway)."""
        predicate = self.key.batch > 1 or self.skip is not None
        in_kernels = self.fused and (self.skip is not None or self.model.fused_decode(self.key.batch))
        for j in range(start, end):
            if predicate and not in_kernels:
                h = torch.where(self.running[:, None, None], h, self.h_exit[:, None])
            h = self.model.run_layers(h, j, j + 1, self.cache, self.slot, fused=self.fused, skip=self.skip,
                                      live=self.running if predicate and in_kernels else None, pdl=self.pdl)
        return h

    def _fill(self, start: int) -> None:
        self.model.fill_kv(self.h_exit, start, self.depth, self.cache, self.rows, self.slot.expand(self.key.batch),
                           kernel=self.fused, pdl=self.pdl)

    def _step_end(self) -> None:
        """The end of a step every row left early: (deferred) keep the frozen states for the later fill, then emit
        the chosen tokens and set the next step up."""
        if self.deferred:
            self.h_pending.index_copy_(1, self.slot, self.h_exit[:, None])
        self._decide(self.depth, self.no_confidence, None, None, final=True, emit=True)

    def start_decoding(self, batch, real_rows: int) -> None:
        """As the fixed modes, and the first step's rows: running unless finished, frozen at their input."""
        super().start_decoding(batch, real_rows)
        self.running.copy_(~self.finished)
        self.h_exit.copy_(self.h0)
        if self.skip is not None:
            self.skip.copy_(~self.running.any())

    def _fill_pending(self, start: int, end: int) -> None:
        """Deferred propagation: keys/values of blocks [start, end) for every pending step that lacks them, in one
        batched fill per starting block (weights read once). Runs eagerly, between graph replays."""
        due = [e for e in self.pending if e[1] < end]
        for first in sorted({max(e[1], start) for e in due}):
            slots = [e[0] for e in due if max(e[1], start) == first]
            b = self.key.batch
            rows = torch.arange(b, device=self.model.device).repeat_interleave(len(slots))
            slot_index = torch.tensor(slots, device=self.model.device).repeat(b)
            hidden = self.h_pending[:, slots].reshape(b * len(slots), -1)
            self.model.fill_kv(hidden, first, end, self.cache, rows, slot_index, kernel=self.fused)
            self.counters["weight_fill_blocks"] += end - first
        for e in due:
            e[1] = end
        self.pending = [e for e in self.pending if e[1] < self.depth]

    @torch.inference_mode()
    def flush_pending(self) -> None:
        """Fill what deferred propagation still owes (the cache is then complete, e.g. for inspection)."""
        self._fill_pending(0, self.depth)

    def advance(self) -> None:
        """One decode step: segments until no row runs, a fill for the skipped layers, then the token."""
        c = self.counters
        c["steps"] += 1
        for index, layer in enumerate(self.stops):
            if self.deferred and self.pending:
                self._fill_pending(self.stops[index - 1] if index else 0, layer)
            self.launch(("segment", index), lambda i=index: self._segment_piece(i))
            c["segments"] += 1
            c["weight_blocks"] = c["weight_blocks"] + layer - (self.stops[index - 1] if index else 0)
            c["weight_heads"] += layer == self.depth or (layer in self.checked and self.policy.measure != "cosine")
            if layer not in self.checked:
                continue  # the depth: its segment ended the step
            c["host_reads"] += 1
            fired, running = self.flags.tolist()  # the one small device-to-host read of this checked exit
            if fired and self.policy.measure == "cosine":
                self.launch(("cosine_head", layer), lambda layer=layer: self._cosine_head(layer))
                c["weight_heads"] += 1
            if not running:
                if self.deferred:
                    self.pending.append([self.host_slot, layer])
                else:
                    self.launch(("fill", layer), lambda layer=layer: self._fill(layer))
                    c["fills"] += 1
                    c["weight_fill_blocks"] += self.depth - layer
                self.launch("end", self._step_end)
                break
        self.host_slot += 1

    def capture(self) -> None:
        """Every piece of the step as its own CUDA graph."""
        pieces = {("segment", i): (lambda i=i: self._segment_piece(i)) for i in range(len(self.stops))}
        if not self.deferred:
            pieces.update({("fill", layer): (lambda layer=layer: self._fill(layer)) for layer in self.checked})
        if self.policy.measure == "cosine":
            pieces.update({("cosine_head", layer): (lambda layer=layer: self._cosine_head(layer))
                           for layer in self.checked})
        pieces["end"] = self._step_end
        self.capture_pieces(pieces)

    def prefill(self, batch, real_rows: int, eos: int | None, uniform, thresholds) -> None:
        """Reset for a new batch, run the prompt at full depth, decide token 0 with the policy on the last
        position's states (no propagation needed: every layer ran)."""
        self.reset(batch, eos, uniform)
        self.counters = dict(segments=0, fills=0, host_reads=0, **weight_reads())
        self.thresholds[: len(thresholds)] = torch.tensor(thresholds, device=self.thresholds.device)
        h = self.model.embed(batch.ids, batch.positions)
        states = {layer: x[:, -1] for layer, x in self.model.run_to(h, self.stops, self.cache, 0).items()}
        states[0] = h[:, -1]
        for layer, buffer in self.saved.items():
            buffer.copy_(states[layer])
        self.running.fill_(True)
        for layer in self.checked:
            self._check(layer, states[layer])
            if self.policy.measure == "cosine":
                self._cosine_head(layer)
        self._final(states[self.depth], emit=False)
        self.emit_first(self.chosen)
        self.start_decoding(batch, real_rows)
        self.host_slot = batch.ids.shape[1]
        self.pending = []

    def describe(self, result, rows: int, produced: int) -> None:
        """Per-token exit layers and confidences, and the step counters, onto a GenerationResult."""
        lengths = [len(t) for t in result.tokens]
        result.exit_layers = [row[:n] for row, n in zip(self.exit_at[:rows, :produced].tolist(), lengths)]
        result.confidences = [row[:n] for row, n in zip(self.conf_at[:rows, :produced].tolist(), lengths)]
        n_tokens = sum(lengths)
        mean = sum(map(sum, result.exit_layers)) / max(n_tokens, 1)
        result.stats = dict(self.counters, depth=self.depth, mean_exit_layer=mean)


class PredicatedEarlyExit(StaticEarlyExit):
    """The same early exit with the whole decode step as one piece (one CUDA graph) and no host read.

    Device-side predication: `skip` is set once no row is running. While it is set every later kernel reads it
    and returns before touching weights: the fused-linear kernels skip everything but c_attn's key/value columns
    (which, fed h_exit, are state propagation), the attention kernel only stores those keys/values, the exit
    heads skip entirely, and the residual kernels pass every row's frozen state through. The decision kernels
    still run (one program per row). The cosine measure's head is skipped unless a row fired. Skipped outputs are
    garbage that no kept value reads."""

    def __init__(self, model: MultiExitGPT2, key: StepKey, backend: str, compile_layers: bool = False):
        key.mode.check_engine("static", backend)
        super().__init__(model, key, backend, compile_layers)
        self.skip = torch.zeros(1, dtype=torch.int32, device=model.device)  # no row running
        self.cosine_skip = torch.zeros(1, dtype=torch.int32, device=model.device)  # no row fired at this check

    def step(self) -> None:
        """Every segment, check and the cosine heads, then the final decision that emits the token: the body one
        CUDA graph captures."""
        h = self.h0[:, None]
        for index, layer in enumerate(self.stops):
            h = self._segment(index, h)
            if layer in self.checked and self.policy.measure == "cosine":
                self._cosine_head(layer)

    def advance(self) -> None:
        self.counters["steps"] += 1
        self.launch("step", self.step)
        self.host_slot += 1

    def capture(self) -> None:
        self.capture_pieces({"step": self.step})

    def prefill(self, batch, real_rows: int, eos: int | None, uniform, thresholds) -> None:
        self.skip.zero_()
        super().prefill(batch, real_rows, eos, uniform, thresholds)

    def describe(self, result, rows: int, produced: int) -> None:
        """As the segment schedule, with the weight reads derived from the recorded exits (nothing is counted on
        the host): per step, the blocks up to the deepest running row's exit, the heads read there, and the key/
        value columns of the blocks above it."""
        super().describe(result, rows, produced)
        reads = weight_reads()
        reads["steps"] = self.counters["steps"]
        cosine = self.policy.measure == "cosine"
        for step in range(1, produced):
            exits = [row[step] for row in result.exit_layers if step < len(row)]
            if not exits:
                continue
            deepest = max(exits)
            reads["weight_blocks"] += deepest
            reads["weight_fill_blocks"] += self.depth - deepest
            fired = {layer for layer in exits if layer < self.depth} if cosine else \
                [layer for layer in self.checked if layer <= deepest]
            reads["weight_heads"] += len(fired) + (deepest == self.depth)
        result.stats.update(reads, segments=0, fills=0, host_reads=0)
