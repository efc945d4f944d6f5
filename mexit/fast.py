"""Fast decode for the fixed modes (original / exit / ACD): one decode step over static buffers, captured once
per (mode, sampling settings, batch bucket, length bucket) as a CUDA graph and replayed for every token.

Nothing in a step talks to the host: the token, position, cache slot and step index live on the device and the
step advances them itself; sampling reads uniform numbers drawn before the loop; eos handling is a mask. The
host only replays the graph and, every `EOS_CHECK_EVERY` steps, reads one flag to stop early when every row has
finished. The prefill runs eagerly (fused attention through scaled_dot_product_attention) into the same
static cache. Without CUDA the same step runs eagerly ("static" engine): that is how CPU tests check it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .generation import GenerationResult, PaddedBatch, check_prompts, cut_at_eos, layer_of, left_pad
from .heads import next_token_distribution
from .model import MultiExitGPT2
from .sampling import SamplingConfig, row_uniforms, sample_from_scores

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_QUANTUM = 128
EOS_CHECK_EVERY = 16
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
    settings baked into it, and the batch and length buckets."""

    mode: object
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    batch: int
    length: int


class StaticBuffers:
    """Device-side decode state of `batch` rows and `length` cache slots: the cache, this step's token, position,
    slot and index, the eos mask, every step's output token, and the uniform numbers of the whole generation."""

    def __init__(self, model: MultiExitGPT2, key: StepKey, backend: str):
        self.model, self.key, self.backend = model, key, backend
        dev, b, t = model.device, key.batch, key.length
        self.cache = model.new_cache(b, t)
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.finished = torch.zeros(b, dtype=torch.bool, device=dev)
        self.eos = torch.full((1,), -1, dtype=torch.long, device=dev)  # -1: no eos
        self.out = torch.zeros(b, t, dtype=torch.long, device=dev)
        self.uniform = torch.zeros(t, b, dtype=torch.float32, device=dev)
        self.graphs: dict = {}  # piece name -> captured CUDA graph (the graph engine)
        self.fused = backend == "triton"  # decode steps through the fused-linear kernels

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
        if uniform is not None:
            self.uniform[: uniform.shape[0]].copy_(uniform)

    def start_decoding(self, batch: PaddedBatch, real_rows: int) -> None:
        """After token 0: filler rows count as finished; the next token goes to the slot after the prompt."""
        self.finished[real_rows:] = True
        self.positions.copy_(batch.positions[:, -1] + 1)
        self.slot.fill_(batch.ids.shape[1])

    def pick(self, greedy: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """Greedy, or sampled from scores [B, V] with this step's uniform numbers."""
        k = self.key
        if not k.do_sample:
            return greedy
        uniform = self.uniform.index_select(0, self.step_index)[0]
        return sample_from_scores(scores, uniform, k.temperature, k.top_k, k.top_p)

    def emit(self, token: torch.Tensor) -> None:
        """Mask finished rows with eos, record the token, advance the step index."""
        token = torch.where(self.finished, self.eos, token)
        self.finished |= token == self.eos
        self.out.index_copy_(1, self.step_index, token[:, None])
        self.tokens.copy_(token)
        self.step_index += 1


class StaticStep(StaticBuffers):
    """The decode step of a fixed mode (original / exit / ACD) over static buffers; one CUDA graph."""

    def __init__(self, model: MultiExitGPT2, key: StepKey, backend: str, compile_layers: bool = False):
        super().__init__(model, key, backend)
        self.layers = [layer_of(h) or model.config.n_layer for h in key.mode.heads()]
        self.run_layers = compiled(self._step_states) if compile_layers else self._step_states

    def _states(self, h: torch.Tensor, slot) -> torch.Tensor:
        """h_0 [B, S, d] -> [E, B, d] last-position states at the layers the heads read."""
        states = self.model.run_to(h, self.layers, self.cache, slot, fused=self.fused)
        return torch.stack([states[layer][:, -1] for layer in self.layers])

    def _step_states(self, h: torch.Tensor) -> torch.Tensor:
        return self._states(h, self.slot)

    def _hidden_to_token(self, hidden: torch.Tensor) -> None:
        need = self.key.do_sample
        greedy, scores = next_token_distribution(self.model, self.key.mode, hidden, self.backend, need_scores=need)
        self.emit(self.pick(greedy, scores))

    def step(self) -> None:
        """One decode step, all on the device: the body a CUDA graph captures."""
        self.cache.valid.index_fill_(1, self.slot, True)
        self._hidden_to_token(self.run_layers(self.model.embed(self.tokens[:, None], self.positions[:, None])))
        self.positions += 1
        self.slot += 1

    def prefill(self, batch: PaddedBatch, real_rows: int, eos: int | None, uniform: torch.Tensor | None) -> None:
        """Reset for a new batch (rows past `real_rows` are filler), run the prompt eagerly, emit token 0."""
        self.reset(batch, eos, uniform)
        self._hidden_to_token(self._states(self.model.embed(batch.ids, batch.positions), 0))
        self.start_decoding(batch, real_rows)

    def capture(self) -> None:
        self.capture_pieces({"step": self.step})

    def advance(self) -> None:
        """One decode step: a graph replay when captured."""
        self.launch("step", self.step)


def generate_static(steps: dict, model: MultiExitGPT2, prompts, mode, max_new_tokens: int,
                    sampling: SamplingConfig, eos: int | None, backend: str, engine: str,
                    on_token=None, compile_layers: bool = False) -> GenerationResult:
    """Generate through the static step of `mode` (a DecodeConfig, or an ExitPolicy: early exit), taken from
    `steps` or built (and, on the graph engine, captured) on first use. Rows are padded to the batch bucket
    with copies of the first prompt; seeded sampling draws the same uniform numbers, in the same order, as the
    eager loop (`row_uniforms`). The host replays steps and reads one eos flag every EOS_CHECK_EVERY steps."""
    from .early_exit import ExitPolicy
    from .fast_early_exit import PredicatedEarlyExit, StaticEarlyExit

    early_exit = isinstance(mode, ExitPolicy)
    if early_exit:
        mode.checked_exits(model.config)
    else:
        mode.validate_for(model.config)
    prompts = check_prompts(prompts, model.config, max_new_tokens)
    rows = len(prompts)
    bucket = batch_bucket(rows)
    padded = left_pad(prompts + [prompts[0]] * (bucket - rows), model.device)
    length = length_bucket(padded.ids.shape[1] + max_new_tokens, model.config.n_positions)
    key = StepKey(mode, sampling.do_sample, sampling.temperature, sampling.top_k, sampling.top_p, bucket, length)
    state = steps.get(key)
    if state is None:
        if compile_layers and backend == "triton":
            warnings.warn("compile=True applies to the torch layer path; the triton backend's decode blocks are "
                          "already fused kernels: not compiling (use backend='torch' to compile)", stacklevel=3)
            compile_layers = False
        kind = StaticStep
        if early_exit:
            kind = PredicatedEarlyExit if mode.schedule == "predicated" else StaticEarlyExit
        state = steps[key] = kind(model, key, backend, compile_layers)
        if engine == "graph":
            try:
                state.capture()
            except Exception as err:  # keep generating: the same step, replayed without a graph
                warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); running the static step "
                              "without a graph", stacklevel=3)
                state.graphs = {}
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
    if engine == "graph" and not state.graphs:
        engine = "static"  # what actually runs
    uniform = None
    if sampling.do_sample:  # the eager loop's numbers: one stream per row (filler rows draw nothing)
        uniform = torch.zeros(max_new_tokens, bucket, device=model.device)
        uniform[:, :rows] = row_uniforms(sampling.seed, rows, max_new_tokens, model.device)
    if early_exit:
        state.prefill(padded, rows, eos, uniform, [mode.threshold_at(i, max_new_tokens) for i in range(max_new_tokens)])
    else:
        state.prefill(padded, rows, eos, uniform)
    if on_token is not None:
        on_token(state.tokens[:rows])
    produced = 1
    for i in range(1, max_new_tokens):
        if eos is not None and i % EOS_CHECK_EVERY == 0 and bool(state.finished.all()):
            break
        state.advance()
        produced += 1
        if on_token is not None:
            on_token(state.tokens[:rows])
    tokens = cut_at_eos(state.out[:rows, :produced].tolist(), eos)
    result = GenerationResult(tokens=tokens, backend=backend, engine=engine)
    if early_exit:
        state.describe(result, rows, produced)
    return result
