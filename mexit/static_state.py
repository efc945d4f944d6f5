"""State shared by every static decode step: batch and length buckets, the engine choice, the step key, and the
device-side buffers (cache, the step's input embedding, token, position, slot, step index, eos mask, outputs,
pre-drawn uniforms) that a step advances by itself and a CUDA graph captures. On the triton backend the step's
last kernel advances them (`kernels/step_epilogue.py`), so a step holds no torch operation; the torch backend runs
the reference of the same epilogue. The fixed-mode step (`mexit/fast.py`) and the early-exit steps
(`mexit/fast_early_exit.py`) build on it; `mexit/static_engine.py` picks one and runs the generation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from mexit.kernels.step_epilogue_ref import StepIO, step_epilogue_ref

from .generation import PaddedBatch
from .model import MultiExitGPT2
from .sampling import sample_from_scores

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_QUANTUM = 128
ENGINES = ("auto", "eager", "static", "graph")


def compiled(fn):
    """torch.compile (inductor, static shapes, one graph) of a static-step piece: fuses the element-wise work
    around the matmuls; the CUDA graph then captures the compiled kernels (compiled during warm-up)."""
    return torch.compile(fn, dynamic=False, fullgraph=True)


def batch_bucket(batch: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= batch), -(-batch // 64) * 64)


def length_bucket(length: int, n_positions: int) -> int:
    return min(-(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM, n_positions)


def resolve_engine(engine: str, device: torch.device) -> str:
    """auto -> graph on CUDA, eager elsewhere; graph without CUDA falls back to static with a warning."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    if engine == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if engine == "graph" and device.type != "cuda":
        warnings.warn("CUDA graphs need a CUDA device: running the same static step eagerly", stacklevel=3)
        return "static"
    return engine


@dataclass(frozen=True)
class StepKey:
    """What a static step is built for: the mode (a DecodeConfig, or an ExitPolicy for early exit), the sampling
    settings baked into it, the batch and length buckets, and whether its kernels use programmatic dependent
    launch."""

    mode: object
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    batch: int
    length: int
    pdl: bool = False


class StaticBuffers:
    """Device-side decode state of `batch` rows and `length` cache slots: the cache, this step's input embedding,
    token, position, slot and index, the eos mask, every step's output token, and the uniform numbers of the whole
    generation; `io` hands the ones the step epilogue advances to the kernels."""

    def __init__(self, model: MultiExitGPT2, key: StepKey, backend: str):
        self.model, self.key, self.backend = model, key, backend
        dev, b, t = model.device, key.batch, key.length
        self.cache = model.new_cache(b, t)
        self.h0 = torch.zeros(b, model.config.n_embd, dtype=model.dtype, device=dev)
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.finished = torch.zeros(b, dtype=torch.bool, device=dev)
        self.eos = torch.full((1,), -1, dtype=torch.long, device=dev)  # -1: no eos
        self.out = torch.zeros(b, t, dtype=torch.long, device=dev)
        self.uniform = torch.zeros(t, b, dtype=torch.float32, device=dev)
        self.io = StepIO(tokens=self.tokens, positions=self.positions, finished=self.finished, eos=self.eos,
                         out=self.out, step=self.step_index, slot=self.slot,
                         arrivals=torch.zeros(1, dtype=torch.int32, device=dev), wte=model.w.wte, wpe=model.w.wpe,
                         h0=self.h0)
        self.graphs: dict = {}  # piece name -> captured CUDA graph (the graph engine)
        self.fused = backend == "triton"  # decode steps through the Triton kernels, epilogue included
        self.pdl = key.pdl and self.fused

    def launch(self, name, fn) -> None:
        """Run a piece of the step: replay its graph when captured, else call it."""
        graph = self.graphs.get(name)
        if graph is not None:
            graph.replay()
        else:
            fn()

    def capture_pieces(self, pieces: dict) -> None:
        """Warm every piece up on a side stream (Triton and inductor compilation, library handles), then capture
        each as its own CUDA graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fn in pieces.values():
                for _ in range(2):
                    self.slot.zero_()
                    self.step_index.zero_()
                    fn()
        torch.cuda.current_stream().wait_stream(stream)
        for name, fn in pieces.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            self.graphs[name] = graph

    def reset(self, batch: PaddedBatch, eos: int | None, uniform: torch.Tensor | None) -> None:
        """Start a new batch (already padded to the bucket): cache validity, eos, step index, uniforms."""
        self.cache.valid.zero_()
        self.cache.valid[:, : batch.ids.shape[1]] = batch.valid
        self.finished.zero_()
        self.eos.fill_(-1 if eos is None else eos)
        self.step_index.zero_()
        self.io.arrivals.zero_()
        if uniform is not None:
            self.uniform[: uniform.shape[0]].copy_(uniform)

    def start_decoding(self, batch: PaddedBatch, real_rows: int) -> None:
        """After token 0 (emitted by `emit_first`): filler rows count as finished; the next token goes to the slot
        after the prompt, and its embedding is the first step's input."""
        self.finished[real_rows:] = True
        self.positions.copy_(batch.positions[:, -1] + 1)
        self.slot.fill_(batch.ids.shape[1])
        self.h0.copy_(self.model.embed(self.tokens.clamp(min=0), self.positions))

    def pick(self, greedy: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """Greedy, or sampled from scores [B, V] with this step's uniform numbers."""
        k = self.key
        if not k.do_sample:
            return greedy
        uniform = self.uniform.index_select(0, self.step_index)[0]
        return sample_from_scores(scores, uniform, k.temperature, k.top_k, k.top_p)

    def emit(self, token: torch.Tensor) -> None:
        """End a decode step with `token` [B] (eos masking, output column, next input, advance): one kernel on the
        triton backend, its reference on the torch backend."""
        if self.fused:
            from mexit.kernels.step_epilogue import step_epilogue

            step_epilogue(token, self.io, pdl=self.pdl)
        else:
            step_epilogue_ref(token, self.io)

    def emit_first(self, token: torch.Tensor) -> None:
        """Token 0, after the prefill: recorded in column 0 (`start_decoding` then sets the first step up)."""
        step_epilogue_ref(token, self.io)
