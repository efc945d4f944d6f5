"""The step protocol: what a mode's decode step sees of the engine that runs it.

A mode (fixed heads, early exit, speculative decoding, ...) writes its step once against `Rows`; an engine
implements `Rows` (mexit/engines/: eager with row compaction, static with predication, graph = captured static).
Every tensor a mode sees covers the whole batch: [B, ...]. On the static engine rows that have left the step
(exited, finished) stay in the batch frozen; on the eager engine the work skips them, but their entries read the
same. The prefill runs the same step on the prompt's last position (every layer computed at once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from mexit.ops import Backend, StepIO

    from .sampling import SamplingConfig


class Candidate(NamedTuple):
    """One head's verdict per row: token [B] int64 (chosen as the step's sampler chooses), max_prob and margin
    (top-1 minus top-2 probability) [B] fp32."""

    token: torch.Tensor
    max_prob: torch.Tensor
    margin: torch.Tensor


class Rows(Protocol):
    """The batch during one decode step, as an engine holds it. A mode reads the step state (`io`) and writes it
    only through these methods; it never touches the KV cache or runs the model's blocks itself. io: the step state
    (`StepIO`); counters: the statistics (`mexit.decoding.stats`); decoded: decode steps done; rows: the batch's
    rows (padding included); steps: output columns; real_rows, max_new_tokens, eos (a tuple of stop ids, or None):
    the generation's; buffers: the mode's own (`Mode.buffers`)."""

    backend: Backend
    sampling: SamplingConfig
    keep_logits: bool  # the fixed modes keep every step's [B, V] logits (`keep`)
    io: StepIO
    counters: dict
    decoded: int
    rows: int
    steps: int
    real_rows: int
    max_new_tokens: int
    eos: tuple[int, ...] | None
    buffers: object
    history: torch.Tensor | None  # [B, L] int64 each row's sequence by position (with the repetition controls)

    @property
    def prefilling(self) -> bool:
        """Whether this is the prompt's step (states of every layer computed at once)."""

    def read(self, tensor: torch.Tensor) -> list:
        """A device-to-host read (counted in `host_reads` outside the prefill)."""

    def finished(self) -> bool:
        """Whether every row has finished (a host read)."""

    def launch(self, key, fn: Callable[[], None]) -> None:
        """Run a piece of the step (on the graph engine: replay its captured graph)."""

    def states(self, layer: int) -> torch.Tensor:
        """[B, d] hidden states at `layer` (0: the step's input), running the blocks still needed."""

    def choose(self, greedy: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """The step's token per row [B]: greedy, or drawn from scores [B, V] with the row's own random stream."""

    def emit(self, token: torch.Tensor) -> None:
        """End the step with `token` [B] (eos masking, output, next input)."""

    # ---- several positions per step (speculative decoding) ----
    def feed(self, tokens: torch.Tensor, offset: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """tokens [B] int64 as new positions at `offset` ([1] int64) past the step's slot and each row's position:
        their cache slot marked valid, embedded, run through the blocks up to max(layers); {layer: [B, 1, d]} at
        each of `layers`."""

    def run_round(self, h: torch.Tensor, start: int, layers: list[int]) -> dict[int, torch.Tensor]:
        """The round's positions, h [B, S, d] the states at layer `start` of the tokens at slots slot..slot+S-1,
        through the blocks up to max(layers); {layer: [B, S, d]} at each of `layers`."""

    def emit_round(self, accepted: torch.Tensor, token: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor,
                   draft_i: torch.Tensor, count: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """End a round (`ops.round_epilogue`): each row's accepted drafts and `token` emitted, the round's slots
        kept or rejected, the next round's slot, positions and input; the repetition controls' history gets token.
        Returns was_finished [B] bool (the rows finished before the round)."""

    def penalize(self, scores: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """The mode's scores after the repetition controls on each row's sequence (unchanged without them): [B, V]
        following each row's last position, or following the positions `last` ([B], or [B, J] for [B, J, V])."""

    def remember(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Write tokens [B] at positions [B] of the rows' sequences (with the repetition controls)."""

    def fused_emit(self) -> StepIO | None:
        """The step state a greedy mode's last kernel may end the step with, or None (then call `emit`)."""

    def keep(self, logits: torch.Tensor) -> None:
        """Keep this step's [B, V] logits of the mode."""

    # ---- per-row exits (early exit) ----
    def candidate(self, hidden: torch.Tensor, head) -> Candidate:
        """`head`'s verdict on hidden [B, d] for the running rows."""

    def decide(self, layer: int, confidence: torch.Tensor | None, token: torch.Tensor | None, hidden: torch.Tensor,
               probe: tuple | None = None) -> None:
        """Running rows whose confidence [B] reaches the step's threshold exit at `layer` with `token` [B] (None:
        chosen later by `fired_token`) and their state hidden [B, d]; the engine keeps the cache consistent.
        probe (weight [d], bias [1], eps) instead of a confidence: a learned exit predictor on hidden, evaluated
        inside the decision (one kernel on the triton backend)."""

    def decide_final(self, layer: int, confidence: torch.Tensor, token: torch.Tensor) -> None:
        """Every row still running exits at the last layer with `token`; the step ends."""

    def fired_token(self, head) -> None:
        """The rows that exited at the last decision take `head`'s token on their exit states."""

    def save(self, layer: int, hidden: torch.Tensor) -> None:
        """Keep [B, d] states of `layer` for a later comparison in the same step."""

    def saved(self, layer: int) -> torch.Tensor:
        ...

    def any_running(self) -> bool:
        """Whether a row still runs (True where the engine decides on the device instead)."""

    def any_fired(self) -> bool:
        """Whether a row exited at the last decision (True where the engine decides on the device instead)."""

    def end_early(self, layer: int) -> None:
        """No row runs past `layer`: propagate the skipped blocks' keys/values and end the step."""


class Mode:
    """What a step computes. The defaults fit modes that emit one token per row per step (fixed heads, early
    exit); a mode overrides what differs (speculative decoding emits several per round)."""

    settings: object  # what it was built from (one of `mexit.decoding.modes.settings_classes()`)
    uses_exits = False  # per-row exit decisions (`ExitState`)
    keeps_logits = False  # it can keep every step's [B, V] scores (one fixed pass per token)
    emits_one_per_step = True  # one token per row per step (speculative decoding: up to K + 1 per round)
    # what an engine needs to run per-row exits (early exit): the exits a step may end at, whether a check decides
    # without a head (the exit's head then runs for the rows that fired), whether it reads learned predictors, and
    # its schedule: skipped blocks' keys/values filled later (deferred) or at once; the step as one predicated piece
    checked: list[int] | tuple = ()
    head_free = False
    reads_predictors = False
    defers_propagation = False
    predicated = False
    saved_layers: tuple | set = ()  # layers whose states a check compares with (cosine)
    stops: list[int]  # the layers whose states the prompt's step reads
    depth: int  # the deepest layer a step may run
    full_heads: int  # heads a full-depth step of the mode (speculative: of its target) reads

    def reference(self, config) -> tuple[int, int]:
        """(blocks, heads) per token that the statistics' `weight_bytes_ratio` compares with: the full model, its
        original head at full depth (a fixed mode's ratio says what it costs against that)."""
        return config.n_layer, 1

    def thresholds(self, max_new_tokens: int) -> list[float] | None:
        """Each step's exit threshold (early exit), else None."""
        return None

    def slots(self, prompt_len: int, max_new_tokens: int) -> int:
        """Cache slots a batch needs: one per position."""
        return prompt_len + max_new_tokens

    def columns(self, max_new_tokens: int) -> int:
        """Output columns (and per-step buffers) a batch needs: one per token."""
        return max_new_tokens

    def streams_needed(self, max_new_tokens: int) -> int:
        """Uniform numbers each row's random stream provides (sampling): one per token."""
        return max_new_tokens

    def buffers(self, rows: Rows) -> object:
        """The mode's own per-batch device buffers (None: none)."""
        return None

    def start(self, rows: Rows, streams: torch.Tensor | None) -> None:
        """After the prompt's step emitted token 0; streams: [real_rows, n] the rows' uniform numbers."""

    def run(self, rows: Rows) -> None:
        """One step (the prompt's too)."""
        raise NotImplementedError

    def pieces(self, rows: Rows) -> dict:
        """The step's pieces by key, for a graph engine to capture."""
        raise NotImplementedError

    def more(self, rows: Rows, check_every: int) -> bool:
        """Whether to run another step: tokens left in the budget, and (every `check_every` steps, with an eos)
        a row still unfinished."""
        produced = rows.decoded + 1
        if produced >= rows.max_new_tokens:
            return False
        return rows.eos is None or produced % check_every or not rows.finished()

    def stream(self, rows: Rows, on_token, done: int) -> int:
        """Pass the positions completed since `done` to on_token([B] tokens); returns the positions passed."""
        on_token(rows.io.tokens[: rows.real_rows])
        return done + 1

    def tokens(self, rows: Rows) -> list[list[int]]:
        """Every row's tokens (eos masking past a row's end; the loop cuts there)."""
        return rows.io.out[: rows.real_rows, : rows.decoded + 1].tolist()

    def describe(self, rows: Rows, result) -> None:
        """Mode-specific results and statistics onto the GenerationResult."""


class OneStep(Mode):
    """A mode whose decode step is one piece that reads `depth` blocks and `full_heads` heads (fixed heads, DoLa);
    a subclass writes `step(rows)`."""

    def step(self, rows: Rows) -> None:
        raise NotImplementedError

    def pieces(self, rows: Rows) -> dict:
        """The step as pieces a graph engine captures: one."""
        return {"step": lambda: self.step(rows)}

    def run(self, rows: Rows) -> None:
        rows.launch("step", lambda: self.step(rows))
        if not rows.prefilling:
            rows.counters["weight_blocks"] += self.depth
            rows.counters["weight_heads"] += self.full_heads
