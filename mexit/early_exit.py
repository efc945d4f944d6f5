"""Confidence-gated early exit (CALM-style) with state propagation that keeps the KV cache consistent.

Per token, the layers run in segments between the checked exits. At each checked exit every still-running
row measures its confidence; rows at or above the threshold take their token from that exit's head and stop.
Every skipped block j still needs keys/values at that position for later tokens: state propagation computes
them from the exited hidden state, K_j, V_j = c_attn_j(ln_1_j(h_exit))[k, v], either at once for all skipped
blocks (eager, one batched matmul) or when the row's next token runs block j (deferred, in the same matmul as
that token). Both give the same cache. The prefill always runs every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .generation import Decoder, GenerationResult, TokenChooser, check_prompts, left_pad
from .heads import exit_stage
from .model import KVCache, MultiExitGPT2
from .sampling import SamplingConfig

MEASURES = ("max-prob", "margin", "cosine")
PROPAGATION = ("eager", "deferred")
SCHEDULES = ("segments", "predicated")


@dataclass(frozen=True)
class ExitPolicy:
    """When a token may stop.

    measure: "max-prob" (max softmax probability of the exit's head, CALM's default), "margin" (top-1 minus
    top-2 probability), or "cosine" (cosine similarity of the hidden states at this checked exit and the
    previous one: no head needed to decide). threshold: exit when confidence >= threshold ([0, 1]; [-1, 1]
    for cosine). decay_tau: CALM's decaying threshold 0.9*T + 0.1*T*exp(-tau*t/N) with N = max_steps (default
    the generation length). exits: checked exit layers (default: all of the checkpoint's below the final
    head's depth), min_layer: no exit below it. final_head: the head of tokens that never exit ("original" or
    an exit layer, which then sets the depth). propagation: "eager" or "deferred". schedule (the static and
    graph engines): "segments" (a graph per segment between checked exits, one flag read per check) or
    "predicated" (the whole step one graph; kernels after the exit read a device flag and return; needs the
    triton backend and eager propagation). Both give the same tokens, exits and cache."""

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
        if self.measure not in MEASURES:
            raise ValueError(f"unknown confidence measure {self.measure!r}; use one of {MEASURES}")
        low = -1.0 if self.measure == "cosine" else 0.0
        if not (isinstance(self.threshold, (int, float)) and low <= self.threshold <= 1.0):
            raise ValueError(f"threshold for {self.measure} must be in [{low:g}, 1], got {self.threshold}")
        if self.decay_tau is not None and not self.decay_tau >= 0:
            raise ValueError(f"decay_tau must be >= 0, got {self.decay_tau}")
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
        """The predicated schedule's kernels read device flags: on the static / graph engines it needs triton (the
        eager engine has its own scheduler and ignores `schedule`)."""
        if self.schedule == "predicated" and engine in ("static", "graph") and backend != "triton":
            raise ValueError(f"the predicated early-exit schedule needs backend='triton' (its kernels read the skip "
                             f"flag), got {backend!r}; use schedule='segments' with the torch backend")

    def depth(self, config: ModelConfig) -> int:
        return config.n_layer if self.final_head == "original" else int(self.final_head)

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


def weight_reads() -> dict:
    """Counters of what decode steps read from weight memory (for the roofline at any batch size): steps, blocks
    run by some row, exit/final heads evaluated, blocks whose k|v weights were read only to propagate states."""
    return dict(steps=0, weight_blocks=0, weight_heads=0, weight_fill_blocks=0)


class DeferredFill:
    """Exited positions whose skipped blocks' keys/values are filled when the row's next token runs each block.

    Called by `MultiExitGPT2.run_layers` before block j's attention: returns the states to fill at block j for
    the running rows, and advances them. `flush` fills whatever is left (end of generation)."""

    def __init__(self, model: MultiExitGPT2, cache: KVCache, depth: int):
        self.model, self.cache, self.depth = model, cache, depth
        self.entries: list[list] = []  # [row, slot, hidden [d], next block to fill]
        self.filled = 0
        self._rows = (None, None)

    def add(self, rows: torch.Tensor, slot: int, hidden: torch.Tensor, from_block: int) -> None:
        if from_block < self.depth:
            self.entries += [[int(r), slot, h, from_block] for r, h in zip(rows.tolist(), hidden)]

    def __call__(self, j: int, rows: torch.Tensor | None):
        if self._rows[0] is not rows:
            self._rows = (rows, None if rows is None else set(rows.tolist()))
        running = self._rows[1]
        due = [e for e in self.entries if e[3] == j and (running is None or e[0] in running)]
        if not due:
            return None
        for e in due:
            e[3] += 1
        self.entries = [e for e in self.entries if e[3] < self.depth]
        self.filled += len(due)
        device = self.cache.k.device
        return (torch.tensor([e[0] for e in due], device=device), torch.tensor([e[1] for e in due], device=device),
                torch.stack([e[2] for e in due]))

    def flush(self) -> int:
        """Fill every remaining entry, one batched fill per starting block (its weights read once). Returns the
        number of blocks whose k|v weights were read."""
        blocks = 0
        for start in sorted({e[3] for e in self.entries}):
            group = [e for e in self.entries if e[3] == start]
            device = group[0][2].device
            rows = torch.tensor([e[0] for e in group], device=device)
            slots = torch.tensor([e[1] for e in group], device=device)
            self.model.fill_kv(torch.stack([e[2] for e in group]), start, self.depth, self.cache, rows, slots)
            self.filled += len(group) * (self.depth - start)
            blocks += self.depth - start
        self.entries = []
        return blocks


class LayerWalker:
    """Hidden states of the still-running rows at increasing layers. Decode steps run blocks lazily on those
    rows; the prefill reads states it already computed for every layer."""

    def __init__(self, model, cache, slot, h, rows, pending=None, precomputed=None, fused=False):
        self.model, self.cache, self.slot, self.pending, self.fused = model, cache, slot, pending, fused
        self.h, self.rows, self.layer = h, rows, 0
        self.precomputed = precomputed  # {layer: [B, d]} for the prefill
        self.blocks_run = 0
        self.deepest = 0  # blocks whose weights this step read (some row ran them)

    def advance(self, layer: int) -> torch.Tensor:
        """[b, d] states of the running rows at `layer`."""
        if self.precomputed is not None:
            self.layer = layer
            return self.precomputed[layer][self.rows]
        if layer > self.layer:
            self.h = self.model.run_layers(self.h, self.layer, layer, self.cache, self.slot, self.rows, self.pending,
                                           self.fused)
            self.blocks_run += (layer - self.layer) * len(self.rows)
            self.layer = self.deepest = layer
        return self.h[:, -1]

    def keep(self, mask: torch.Tensor) -> None:
        self.rows = self.rows[mask]
        if self.precomputed is None:
            self.h = self.h[mask]


class EarlyExitRun:
    """One batch under an ExitPolicy: decides, per row and token, where it exits; propagates states."""

    def __init__(self, model, policy, decoder, chooser, backend, n_steps):
        self.model, self.policy, self.decoder, self.chooser = model, policy, decoder, chooser
        self.backend, self.n_steps = backend, n_steps
        config = model.config
        self.depth = policy.depth(config)
        self.checked = policy.checked_exits(config)
        self.final_head = policy.final_head
        self.previous = policy.previous_layers(config)
        batch = decoder.cache.k.shape[1]
        self.exit_layers = [[] for _ in range(batch)]
        self.confidences = [[] for _ in range(batch)]
        self.pending = DeferredFill(model, decoder.cache, self.depth) if policy.propagation == "deferred" else None
        self.stats = dict(blocks_run=0, head_rows=0, kv_filled=0, checks=0, **weight_reads())
        self.decoding = False  # the weight-read counters cover decode steps, not the prefill

    def head(self, hidden: torch.Tensor, head):
        self.stats["head_rows"] += hidden.shape[0]
        self.stats["weight_heads"] += self.decoding
        return exit_stage(self.model, hidden[None], [head], self.backend, with_logprobs=self.chooser.sampling.do_sample)

    def decide(self, walker: LayerWalker, step: int, uniform, slot: int | None) -> torch.Tensor:
        """Run the policy over the walker's rows; returns this step's tokens [B] (rows not running get 0)."""
        tokens = torch.zeros(self.decoder.cache.k.shape[1], dtype=torch.long, device=self.model.device)
        threshold = self.policy.threshold_at(step, self.n_steps)
        saved = {}
        for layer in self.checked:
            if len(walker.rows) == 0:
                break
            if self.policy.measure == "cosine":  # decide without a head; run it only for the rows that fire
                prev = self.previous[layer]
                if prev not in saved:
                    saved[prev] = walker.advance(prev)
                h = saved[layer] = walker.advance(layer)
                confidence = F.cosine_similarity(h.float(), saved[prev].float(), dim=-1)
                fire = confidence >= threshold
                out = self.head(h[fire], layer) if bool(fire.any()) else None
                selected = slice(None)  # out's rows are the firing rows
            else:
                h = walker.advance(layer)
                out = self.head(h, layer)
                confidence = (out.max_prob if self.policy.measure == "max-prob" else out.margin)[0]
                fire = confidence >= threshold
                selected = fire
            self.stats["checks"] += len(walker.rows)
            if not bool(fire.any()):
                continue
            rows = walker.rows[fire]
            greedy = out.argmax[0][selected]
            scores = out.logprobs[0][selected] if out.logprobs is not None else None
            tokens[rows] = self.chooser.pick(greedy, scores, None if uniform is None else uniform[rows])
            self.record(rows, layer, confidence[fire])
            if slot is not None:
                self.propagate(h[fire], layer, rows, slot)
            walker.keep(~fire)
            saved = {k: v[~fire] for k, v in saved.items()}
        if len(walker.rows):
            out = self.head(walker.advance(self.depth), self.final_head)
            tokens[walker.rows] = self.chooser.pick(out.argmax[0], out.logprobs[0] if out.logprobs is not None
                                                    else None, None if uniform is None else uniform[walker.rows])
            self.record(walker.rows, self.depth, out.max_prob[0])
        return tokens

    def record(self, rows, layer, confidence):
        for r, c in zip(rows.tolist(), confidence.tolist()):
            self.exit_layers[r].append(layer)
            self.confidences[r].append(c)

    def propagate(self, hidden, layer, rows, slot):
        """Keys/values of blocks layer..depth-1 for the exited positions (rows, slot) from their state."""
        if self.pending is not None:
            self.pending.add(rows, slot, hidden, layer)
            return
        self.model.fill_kv(hidden, layer, self.depth, self.decoder.cache, rows,
                           torch.full_like(rows, slot))
        self.stats["kv_filled"] += len(rows) * (self.depth - layer)
        self.stats["weight_fill_blocks"] += self.depth - layer


def generate_early_exit(model: MultiExitGPT2, prompts, policy: ExitPolicy, max_new_tokens: int,
                        sampling: SamplingConfig, eos_token_id: int | None, backend: str,
                        return_cache: bool = False, on_token=None) -> GenerationResult:
    """Generate under `policy`. Returns tokens plus, per row and token, the exit layer and its confidence
    (max probability of the final head for tokens that ran full depth; the measure's value otherwise)."""
    prompts = check_prompts(prompts, model.config, max_new_tokens)
    policy.checked_exits(model.config)
    decoder = Decoder(model, left_pad(prompts, model.device), max_new_tokens, fused=backend == "triton")
    chooser = TokenChooser(sampling, len(prompts), model.device, eos_token_id, max_new_tokens)
    run = EarlyExitRun(model, policy, decoder, chooser, backend, max_new_tokens)
    batch = len(prompts)
    all_rows = torch.arange(batch, device=model.device)

    h, slot = decoder.prefill_input()
    stops = sorted({0, run.depth, *run.checked, *run.previous.values()})
    states = {0: h[:, -1], **decoder.run_to(h, slot, [s for s in stops if s > 0])}
    uniform = chooser.uniform() if sampling.do_sample else None
    tokens = chooser.record(run.decide(LayerWalker(model, None, None, None, all_rows, precomputed=states), 0,
                                       uniform, None))
    run.decoding = True
    if on_token is not None:
        on_token(tokens)
    for step in range(1, max_new_tokens):
        if chooser.all_finished():
            break
        h, slot = decoder.step_input(tokens, step - 1)
        running = ~chooser.finished
        walker = LayerWalker(model, decoder.cache, slot, h[running], all_rows[running], run.pending,
                             fused=decoder.fused)
        uniform = chooser.uniform() if sampling.do_sample else None
        tokens = chooser.record(run.decide(walker, step, uniform, slot))
        run.stats["blocks_run"] += walker.blocks_run
        run.stats["steps"] += 1
        run.stats["weight_blocks"] += walker.deepest
        if on_token is not None:
            on_token(tokens)
    if run.pending is not None:
        run.stats["weight_fill_blocks"] += run.pending.flush()
        run.stats["kv_filled"] = run.pending.filled
    rows = chooser.rows()
    exit_layers = [layers[: len(r)] for layers, r in zip(run.exit_layers, rows)]
    confidences = [c[: len(r)] for c, r in zip(run.confidences, rows)]
    n_tokens = sum(len(r) for r in exit_layers)
    run.stats["mean_exit_layer"] = sum(map(sum, exit_layers)) / max(n_tokens, 1)
    run.stats["depth"] = run.depth
    return GenerationResult(tokens=rows, backend=backend, exit_layers=exit_layers, confidences=confidences,
                            stats=run.stats, cache=decoder.cache if return_cache else None)
