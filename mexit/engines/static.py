"""The static engine: every shape fixed per (mode, sampling settings, backend, batch bucket, length bucket), every
value of the step on the device, rows that leave a step frozen in the batch (predication) instead of removed. A
step is one or more pieces with no host read inside; the graph engine captures each piece once as a CUDA graph and
replays it for every token. The host reads a value only where the schedule says: early exit on the segment
schedule reads one flag per checked exit (does a row still run?), the loop one all-finished flag every
CHECK_EVERY steps. Without CUDA the same pieces run uncaptured ("static"): how CPU tests check what graphs replay.

Early exit runs the segments of its step as pieces. A frozen row feeds every later block its exit state, so the
block's key/value write for it is state propagation; once no row runs, the step ends with one fill piece (the
skipped blocks' key/value weights, 2·d² of each block's 12·d²) or, deferred, records what is owed and fills it
right before a later step's segment runs those blocks. The predicated schedule (triton) is the whole step as one
piece: kernels past the exit read a device flag and return."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from mexit import ops
from mexit.decoding.prompts import left_pad
from mexit.decoding.stats import weight_reads
from mexit.decoding.step import Candidate

from .base import DecodeState
from .exits import PendingKV

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_QUANTUM = 128
CHECK_EVERY = 16  # steps between the loop's all-finished reads


def batch_bucket(batch: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= batch), -(-batch // 64) * 64)


def length_bucket(length: int, n_positions: int) -> int:
    return min(-(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM, n_positions)


@dataclass(frozen=True)
class StepKey:
    """What a static step is built for: the mode's settings (a DecodeConfig, a DolaConfig or an ExitPolicy), the
    sampling settings baked into it (the repetition controls too), the backend (kernels, PDL, the fused-row cut-off),
    the batch and length buckets, and whether it keeps every step's logits."""

    mode: object
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    backend: object
    batch: int
    length: int
    keep_logits: bool = False
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    top_p_after_top_k: bool = False


class StaticState(DecodeState):
    """One static step's buffers and pieces."""

    engine = "static"

    def __init__(self, *args, compile_layers: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.predicated = self.exits is not None and self.exits.skip is not None
        self.graphs: dict = {}
        self.in_piece = False
        self.flags_read = None
        self.tested_layer = None  # the checked exit the last segment ended at
        self.committed = False  # whether that check's commit ran
        self.compile_layers = compile_layers
        self.blocks: dict = {}  # (start, end) -> the blocks' function (torch.compile'd with compile_layers)
        d = self.model.config.n_embd
        self.all_rows = torch.arange(self.rows, device=self.model.device)
        self.h = None  # the states a segment hands to the next (early exit on the segment schedule)
        if self.exits is not None and not self.predicated:
            self.h = torch.zeros(self.rows, d, dtype=self.model.dtype, device=self.model.device)
        self.h_pending = None
        self.spans = []  # per segment: (first block, end block), read on every launch
        if self.exits is not None:
            stops = self.mode.stops
            self.spans = [(stops[i - 1] if i else 0, stop) for i, stop in enumerate(stops)]
        if self.exits is not None and self.mode.defers_propagation:
            self.h_pending = torch.zeros(self.rows, self.cache.k.shape[3], d, dtype=self.model.dtype,
                                         device=self.model.device)
            self.pending = PendingKV(self.fill_kv, self.mode.depth)

    def engine_counters(self) -> dict:
        return dict(segments=0, fills=0) if self.exits is not None else {}

    # ---- pieces ----
    def pieces(self) -> dict:
        """Every piece a step may launch, by key (what the graph engine captures)."""
        if self.predicated:
            return {"step": lambda: self.mode.run(self)}
        pieces = dict(self.mode.pieces(self))
        if self.exits is not None:
            if not self.backend.triton:
                pieces.update({("commit", layer): self.commit_piece(layer) for layer in self.mode.checked})
            if self.pending is None:
                pieces.update({("fill", layer): functools.partial(self.fill, layer) for layer in self.mode.checked})
            pieces["end"] = self.end_step
        return pieces

    def launch(self, key, fn) -> None:
        """Replay the piece's graph when captured, else run it. Inside a piece (the predicated step) or the
        prompt's step, pieces are plain calls."""
        self.flags_read = None  # a piece may decide: the next check reads the flags anew
        segment = type(key) is tuple and key[0] == "segment"
        if segment:
            layer = self.spans[key[1]][1]
            self.tested_layer, self.committed = (layer if layer in self.mode.checked else None), False
        if self.in_piece or self.prefill_states is not None:
            fn()
            return
        self.count(key)
        if self.pending is not None and segment:  # deferred keys/values those blocks are about to read
            self.pending.fill(*self.spans[key[1]])
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            self.run_piece(key, fn)

    def run_piece(self, key, fn) -> None:
        """A piece between static buffers (the body a graph captures): it starts from the step's input or the
        states the previous segment left, and hands its states on."""
        self.in_piece = True
        try:
            span = self.spans[key[1]] if type(key) is tuple and key[0] == "segment" else None
            if key == "step" or span:
                start = span[0] if span else 0
                self.layer, self.current = start, (self.h if start else self.io.h0)
            fn()
            if span and span[1] != self.mode.depth:
                self.h.copy_(self.current)
        finally:
            self.in_piece = False

    def count(self, key) -> None:
        """The weight reads of a launched piece, counted on the host (the predicated step's are derived from its
        exits afterwards: `describe`)."""
        c, mode = self.counters, self.mode
        if not isinstance(key, tuple):
            return
        if key[0] == "segment":
            start, end = self.spans[key[1]]
            c["segments"] += 1
            c["weight_blocks"] += end - start
            c["weight_heads"] += end == mode.depth or (end in mode.checked and not mode.head_free)
            c["weight_predictors"] += end in mode.checked and mode.reads_predictors
        elif key[0] == "fired_head":
            c["weight_heads"] += 1
        elif key[0] == "fill":
            c["fills"] += 1
            c["weight_fill_blocks"] += mode.depth - key[1]

    def capture(self) -> None:
        """Warm every piece up on a side stream (Triton compilation, library handles), then capture each as its
        own CUDA graph. The warm-up runs on whatever the buffers hold; `prefill` resets them."""
        pieces = self.pieces()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for key, fn in pieces.items():
                for _ in range(2):
                    self.io.slot.zero_()
                    self.io.step.zero_()
                    self.run_piece(key, fn)
        torch.cuda.current_stream().wait_stream(stream)
        for key, fn in pieces.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.run_piece(key, fn)
            self.graphs[key] = graph
        self.engine = "graph"

    def run_step(self) -> None:
        if self.predicated:
            self.launch("step", lambda: self.mode.run(self))
        else:
            self.mode.run(self)

    # ---- Rows primitives ----
    def states(self, layer: int) -> torch.Tensor:
        if self.prefill_states is not None:
            return self.prefill_states[layer]
        if layer > self.layer:
            if self.layer == 0 and not self.backend.triton:  # the torch attention reads the slot's validity
                self.cache.mark(self.io.slot)
            self.current = self.run_blocks(self.layer, layer)(self.current.unsqueeze(1)).squeeze(1)
            self.layer = layer
        return self.current

    def run_blocks(self, start: int, end: int):
        """h [B, 1, d] -> the states after blocks start..end-1 for every row: rows no longer running are frozen
        (their input passes through; with one row on the segment schedule nothing needs freezing: a segment runs
        only while it runs)."""
        fn = self.blocks.get((start, end))
        if fn is None:
            x = self.exits
            live = x.running if x is not None and (self.rows > 1 or self.predicated) else None
            skip = x.skip if x is not None else None
            # the segment schedule checks states where a step ends: at the depth, or `end_step` on the exit states
            check = x is None or self.predicated or end == self.mode.depth
            fn = functools.partial(self.model.run_layers, start=start, end=end, cache=self.cache, slot=self.io.slot,
                                   backend=self.backend, skip=skip, live=live, check=check)
            if self.compile_layers:
                fn = torch.compile(fn, dynamic=False, fullgraph=True)
            self.blocks[(start, end)] = fn
        return fn

    def candidate(self, hidden: torch.Tensor, head) -> Candidate:
        return self.verdict(self.head_out(hidden, head, self.exits.skip), self.uniform_now())

    def fired_token(self, head) -> None:
        x = self.exits
        token = self.verdict(self.head_out(x.h_exit, head, x.fired_skip), self.uniform_now()).token
        torch.where(x.fired, token, x.chosen, out=x.chosen)  # one kernel: the fired rows take the head's token

    def read_flags(self) -> list[bool]:
        """(a row fired, a row runs): one device-to-host read per check. After a test (torch backend) the read is of
        its outcome (`test_outcome`), and the commit piece runs when a row fired."""
        if self.flags_read is None:
            if not self.tests_first:
                self.flags_read = self.read(self.exits.flags)
                return self.flags_read
            fired, running = self.test_outcome()
            flags = [any(fired), any(r and not f for f, r in zip(fired, running))]
            if flags[0] and not self.committed:  # once per check (a fired_head launch reads the outcome again)
                self.launch(("commit", self.tested_layer), self.commit_piece(self.tested_layer))
                self.committed = True
            self.flags_read = flags
        return self.flags_read

    def commit_piece(self, layer: int):
        """The commit after a test at `layer` that fired: on the states the segment handed on."""
        return functools.partial(self.commit, layer, self.h, not self.mode.head_free)

    def any_running(self) -> bool:
        return self.predicated or self.read_flags()[1]

    def any_fired(self) -> bool:
        return self.predicated or self.read_flags()[0]

    def end_early(self, layer: int) -> None:
        if not self.prefilling:
            if self.pending is not None:
                slot = self.prompt_len + self.decoded
                rows = self.all_rows
                self.pending.add(rows, torch.full_like(rows, slot), self.h_pending[:, slot], layer)
            else:
                self.launch(("fill", layer), functools.partial(self.fill, layer))
        self.launch("end", self.end_step)

    def fill(self, layer: int) -> None:
        """Keys/values of blocks layer..depth-1 for every row's frozen state at this step's slot."""
        self.model.fill_kv(self.exits.h_exit, layer, self.mode.depth, self.cache, self.all_rows,
                           self.io.slot.expand(self.rows), self.backend)

    def end_step(self) -> None:
        """A step every row left early ends: its exit states checked (`check_states`), (deferred) the frozen states
        kept for the later fill, then the emit."""
        c = self.cache
        if c.health is not None and not self.prefilling and not self.predicated:
            ops.check_states(self.exits.h_exit[:, None], c.health, c.valid, self.io.slot, backend=self.backend)
        if self.h_pending is not None and not self.prefilling:
            self.h_pending.index_copy_(1, self.io.slot, self.exits.h_exit[:, None])
        self.decide_final(self.mode.depth, None, None)

    def describe(self, result) -> None:
        if self.predicated:  # weight reads from the exits: per step, the blocks up to the deepest running row's
            # exit, the heads read on the way there, the key/value columns of the blocks above it
            reads, mode = weight_reads(), self.mode
            reads["steps"] = self.counters["steps"]
            lengths = [len(t) for t in result.tokens]
            rows = [row[:n] for row, n in zip(self.exits.exit_at[: self.real_rows, : max(lengths)].tolist(), lengths)]
            for step in range(1, max(lengths)):
                exits = [row[step] for row in rows if step < len(row)]
                if not exits:
                    continue
                deepest = max(exits)
                reads["weight_blocks"] += deepest
                reads["weight_fill_blocks"] += mode.depth - deepest
                fired = {layer for layer in exits if layer < mode.depth} if mode.head_free else \
                    [layer for layer in mode.checked if layer <= deepest]
                reads["weight_heads"] += len(fired) + (deepest == mode.depth)
                if mode.reads_predictors:  # the decision kernels run (and read) at every checked exit
                    reads["weight_predictors"] += len(mode.checked)
            self.counters.update(reads)
        super().describe(result)


class StaticEngine:
    """Builds (and on the graph engine captures) the static step of a mode once per StepKey, and starts batches on
    it. graph: capture CUDA graphs (a capture that fails warns and runs the same pieces uncaptured)."""

    check_every = CHECK_EVERY

    def __init__(self, graph: bool, compile_layers: bool = False):
        self.graph, self.compile_layers = graph, compile_layers
        self.states: dict[StepKey, StaticState] = {}

    @property
    def name(self) -> str:
        return "graph" if self.graph else "static"

    def start(self, model, backend, mode, spec, prompts: list[list[int]], sampling, eos, max_new_tokens: int,
              uniform, thresholds, keep_logits: bool = False) -> StaticState:
        """A prefilled state for `prompts` (padded to the batch bucket with copies of the first prompt)."""
        rows = len(prompts)
        bucket = batch_bucket(rows)
        padded = left_pad(prompts + [prompts[0]] * (bucket - rows), model.device)
        prompt_len = padded.ids.shape[1]
        length = length_bucket(prompt_len + max_new_tokens, model.config.n_positions)
        slots = max(length, -(-mode.slots(prompt_len, max_new_tokens) // LENGTH_QUANTUM) * LENGTH_QUANTUM)
        columns = max(length, -(-mode.columns(max_new_tokens) // LENGTH_QUANTUM) * LENGTH_QUANTUM)
        key = StepKey(spec, sampling.do_sample, sampling.temperature, sampling.top_k, sampling.top_p, backend, bucket,
                      slots, keep_logits, sampling.repetition_penalty, sampling.no_repeat_ngram_size,
                      sampling.top_p_after_top_k)
        state = self.states.get(key)
        if state is None:
            compile_layers = self.compile_layers
            if compile_layers and backend.triton:
                warnings.warn("compile=True applies to the torch layer path; the triton backend's decode blocks are "
                              "already fused kernels: not compiling (use backend='torch' to compile)", stacklevel=4)
                compile_layers = False
            state = self.states[key] = StaticState(model, backend, mode, sampling, bucket, slots, columns,
                                                   keep_logits, mode.predicated, compile_layers=compile_layers)
            if self.graph:
                try:
                    state.capture()
                except Exception as err:  # keep generating: the same pieces, run without a graph
                    warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); running the static step "
                                  "without a graph", stacklevel=4)
                    state.graphs = {}
                    state.engine = "static"
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
        state.prefill(padded, rows, eos, max_new_tokens, uniform, thresholds)
        return state
