"""Lossless self-speculative decoding: exit-head drafts, one full-depth verification, the target's tokens.

Each round, per row: draft up to `draft_len` tokens with blocks 1..L and exit L's head (stopping early where the
draft's top probability falls below `draft_threshold`), then verify the round's first token and its drafts in
one pass. Blocks 1..L never see upper blocks, so the drafts' keys/values there are already the full model's and
their h_L is kept: verification runs blocks L+1..N on all the round's positions at once (plus blocks 1..L for the
last draft, the only position drafting did not feed through them) and the target head on every position. A row
keeps the longest prefix where draft == target choice plus the target's next token (greedy: exactly the full
model's output), or, sampling, accepts draft x with probability min(1, q(x)/p(x)) and otherwise draws from
max(0, q - p) (Leviathan et al. 2023; Chen et al. 2023), which leaves the target distribution q unchanged.

Rows advance independently: all rows write a round's positions at the same cache slots, and each row marks the
slots of its rejected drafts invalid (masked from then on, as if never written; the cache keeps its shape), so
no row waits for another's rejection. Its positions (and so its position embeddings) count only accepted tokens.

The target is any fixed mode: the original head, an exit, or ACD (upper, lower). With ACD and drafts from its
lower exit, the drafts' logits are the lower exit's logits at those positions and are reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DecodeConfig
from .generation import GenerationResult, PaddedBatch, check_prompts, cut_at_eos, layer_of, left_pad
from .heads import exit_stage
from .model import KVCache, MultiExitGPT2
from .sampling import SamplingConfig, sample_from_probs, sampling_probs


@dataclass(frozen=True)
class SpeculativeConfig:
    """draft_exit: the exit layer whose head drafts (below the target's depth); draft_len: drafts per round at
    most; draft_threshold: stop a row's drafting at a draft whose top probability is below it (None: never).
    The default draft_len=1 is the cheapest setting measured on the small real model (bench/RESULTS.md): each
    draft reads its exit head, so longer drafts pay only with high acceptance."""

    draft_exit: int
    draft_len: int = 1
    draft_threshold: float | None = None

    def __post_init__(self):
        if isinstance(self.draft_exit, bool) or not isinstance(self.draft_exit, int):
            raise ValueError(f"draft_exit must be an exit layer number, got {self.draft_exit!r}")
        if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or self.draft_len < 1:
            raise ValueError(f"draft_len must be an integer >= 1, got {self.draft_len!r}")
        if self.draft_threshold is not None and not 0.0 <= self.draft_threshold <= 1.0:
            raise ValueError(f"draft_threshold must be in [0, 1], got {self.draft_threshold}")

    def validate_for(self, model: MultiExitGPT2, target: DecodeConfig) -> int:
        """Check the draft exit against the checkpoint and the target; returns the target's depth."""
        config = model.config
        target.validate_for(config)
        if self.draft_exit not in config.exit_layers:
            raise ValueError(f"draft exit {self.draft_exit} is not in this checkpoint; its exits are "
                             f"{list(config.exit_layers) or 'none'}")
        depth = max(layer_of(head) or config.n_layer for head in target.heads())
        if self.draft_exit >= depth:
            raise ValueError(f"draft exit {self.draft_exit} must sit below the target's depth ({depth} layers): a "
                             "draft as deep as its target saves nothing")
        return depth


class SpeculativeRun:
    """State of one batch: cache, per-row positions, the shared next slot, emitted tokens and statistics."""

    def __init__(self, model: MultiExitGPT2, spec: SpeculativeConfig, target: DecodeConfig, batch: PaddedBatch,
                 max_new_tokens: int, sampling: SamplingConfig, eos: int | None, backend: str):
        self.model, self.spec, self.target, self.sampling = model, spec, target, sampling
        self.backend, self.eos, self.max_new = backend, eos, max_new_tokens
        self.depth = spec.validate_for(model, target)
        self.heads = target.heads()
        self.layers = [layer_of(h) or model.config.n_layer for h in self.heads]
        rows, prompt_len = batch.ids.shape
        # every round uses at most draft_len + 1 slots and emits at least one token per unfinished row
        slots = prompt_len + (max_new_tokens - 1) * (spec.draft_len + 1) + 1
        c = model.config
        shape = (c.n_layer, rows, c.n_head, slots, c.head_dim)
        self.cache = KVCache(torch.zeros(shape, device=model.device, dtype=model.dtype),
                             torch.zeros(shape, device=model.device, dtype=model.dtype),
                             torch.zeros(rows, slots, device=model.device, dtype=torch.bool))
        self.cache.valid[:, :prompt_len] = batch.valid
        self.batch, self.rows, self.slot = batch, rows, prompt_len
        self.positions = batch.positions[:, -1] + 1  # position of each row's next input token
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.drafted_flags: list[list[bool]] = [[] for _ in range(rows)]
        self.finished = [False] * rows
        self.stats = dict(rounds=0, drafted=[0] * rows, accepted=[0] * rows, verifications=[0] * rows,
                          block_passes=0, head_passes=0)
        self.generators = None
        if sampling.do_sample:
            seeds = sampling.seed if isinstance(sampling.seed, tuple) else [sampling.seed] * rows
            if len(seeds) != rows:
                raise ValueError(f"{len(seeds)} seeds for {rows} prompts: pass one seed, or one per prompt")
            self.generators = [None if s is None else torch.Generator(device=model.device).manual_seed(int(s))
                               for s in seeds]

    # --- the pieces a round is made of ---------------------------------------------------------------------
    def run(self, h: torch.Tensor, start: int, end: int, slot: int) -> torch.Tensor:
        self.stats["block_passes"] += end - start
        return self.model.run_layers(h, start, end, self.cache, slot, fused=self.backend == "triton")

    def head_logits(self, hidden: torch.Tensor, heads: list) -> torch.Tensor:
        """hidden [E, n, d] -> [E, n, V] fp32 logits of `heads` (each head read once for all n rows)."""
        self.stats["head_passes"] += len(heads)
        return exit_stage(self.model, hidden, heads, self.backend).logits.float()

    def target_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[E, n, V] head logits -> [n, V] the target mode's scores (the head's logits, or ACD's log q)."""
        if self.target.mode != "contrast":
            return logits[0]
        from mexit.kernels.acd_contrast_ref import acd_contrast_ref

        return acd_contrast_ref(logits[0], logits[1], self.target.alpha, self.target.min_candidates).float()

    def uniforms(self, count: int) -> torch.Tensor:
        """[rows, count] uniform numbers, each row from its own stream (seeded runs repeat exactly)."""
        return torch.stack([torch.rand(count, generator=g, device=self.model.device) for g in self.generators])

    def emit(self, row: int, token: int, drafted: bool) -> None:
        if self.finished[row]:
            return
        self.tokens[row].append(token)
        self.drafted_flags[row].append(drafted)
        if token == self.eos or len(self.tokens[row]) >= self.max_new:
            self.finished[row] = True

    def choose(self, scores: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
        """Greedy argmax, or a draw from the sampling distribution of scores [n, V]."""
        if uniform is None:
            return scores.argmax(-1)
        s = self.sampling
        return sample_from_probs(sampling_probs(scores, s.temperature, s.top_k, s.top_p), uniform)

    # --- prefill and rounds ---------------------------------------------------------------------------------
    def prefill(self) -> torch.Tensor:
        """The prompt through every layer the target reads; returns each row's first token [rows]."""
        model, b = self.model, self.batch
        h = model.embed(b.ids, b.positions)
        states, start = {}, 0
        for layer in sorted(set(self.layers)):
            h = states[layer] = self.run(h, start, layer, 0)
            start = layer
        logits = self.head_logits(torch.stack([states[layer][:, -1] for layer in self.layers]), self.heads)
        uniform = self.uniforms(1)[:, 0] if self.sampling.do_sample else None
        first = self.choose(self.target_scores(logits), uniform)
        for r in range(self.rows):
            self.emit(r, int(first[r]), drafted=False)
        return first

    def round(self, last: torch.Tensor) -> torch.Tensor:
        """One draft + verify round from each row's last emitted token [rows]; returns the new last tokens."""
        model, spec, L, k = self.model, self.spec, self.spec.draft_exit, self.spec.draft_len
        sampling = self.sampling.do_sample
        s0 = self.slot
        low_layers = sorted({layer for layer in self.layers if layer < L} | {L})
        saved = {layer: [] for layer in low_layers}  # per draft step: [rows, d] states at each layer <= L
        drafts, draft_logits, draft_probs = [], [], []
        proposing = torch.tensor([not f for f in self.finished], device=model.device)
        n_drafts = torch.zeros(self.rows, dtype=torch.long, device=model.device)
        u = self.uniforms(2 * k + 1) if sampling else None
        x = last
        steps = 0
        for i in range(k):
            states = self.lower_pass(x, s0 + i, i, low_layers)
            for layer in low_layers:
                saved[layer].append(states[layer])
            logits = self.head_logits(states[L][None], [L])[0]
            steps += 1
            probs = None
            if sampling:
                s = self.sampling
                probs = sampling_probs(logits, s.temperature, s.top_k, s.top_p)
                d = sample_from_probs(probs, u[:, i])
                confidence = probs.max(-1).values
            else:
                d = logits.argmax(-1)
                confidence = torch.softmax(logits, -1).max(-1).values
            if spec.draft_threshold is not None:
                proposing &= confidence >= spec.draft_threshold
            n_drafts += proposing.long()
            drafts.append(d)
            draft_logits.append(logits)
            draft_probs.append(probs)
            if not bool(proposing.any()):
                break
            x = d
        width = int(n_drafts.max())  # drafts verified this round (rows with fewer just compare fewer)
        inputs = torch.stack([last, *drafts[:width]], dim=1)  # [rows, width + 1]
        if width == steps:  # the last draft has not been through blocks 1..L yet
            states = self.lower_pass(inputs[:, width], s0 + width, width, low_layers)
            for layer in low_layers:
                saved[layer].append(states[layer])
        h_low = {layer: torch.stack(saved[layer][: width + 1], dim=1) for layer in low_layers}  # [rows, w+1, d]
        self.cache.valid[:, s0 + width + 1: s0 + steps + 1] = False  # drafted past the verified width
        states = dict(h_low)
        h, start = h_low[L], L
        for layer in sorted({layer for layer in self.layers if layer > L}):
            h = states[layer] = self.run(h, start, layer, s0)
            start = layer
        scores = self.verify_scores(states, draft_logits, width)  # [rows, width + 1, V]
        # one device-to-host read per round for the draft ids, counts and (greedy) the target's choices
        draft_ids = torch.stack(drafts[:width], dim=1).tolist() if width else [[] for _ in range(self.rows)]
        counts = n_drafts.tolist()
        choices = scores.argmax(-1).tolist() if u is None else None
        new_last = last.clone()
        for r in range(self.rows):
            if self.finished[r]:
                self.cache.valid[r, s0: s0 + width + 1] = False
                continue
            if u is None:
                accepted = 0
                while accepted < counts[r] and draft_ids[r][accepted] == choices[r][accepted]:
                    accepted += 1
                token = choices[r][accepted]
            else:
                accepted, token = self.accept_sampled(r, scores[r], draft_ids[r], draft_probs, counts[r], u)
            self.stats["drafted"][r] += counts[r]
            self.stats["accepted"][r] += accepted
            self.stats["verifications"][r] += 1
            for i in range(accepted):
                self.emit(r, draft_ids[r][i], drafted=True)
            self.emit(r, token, drafted=False)
            self.cache.valid[r, s0 + accepted + 1: s0 + width + 1] = False  # rejected drafts: never written
            self.positions[r] += accepted + 1
            new_last[r] = token
        self.slot = s0 + max(width + 1, steps)
        self.stats["rounds"] += 1
        return new_last

    def lower_pass(self, tokens: torch.Tensor, slot: int, offset: int, layers: list[int]) -> dict:
        """Tokens [rows] at `slot` (positions self.positions + offset) through blocks 1..max(layers):
        {layer: [rows, d]}."""
        self.cache.valid[:, slot] = True
        h = self.model.embed(tokens[:, None], (self.positions + offset)[:, None])
        out, start = {}, 0
        for layer in layers:
            h = self.run(h, start, layer, slot)
            out[layer] = h[:, 0]
            start = layer
        return out

    def verify_scores(self, states: dict, draft_logits: list, width: int) -> torch.Tensor:
        """The target's scores [rows, width + 1, V] at the round's positions; with ACD whose lower exit is the
        draft exit, the drafts' logits (draft_logits[i]: exit L at position i) are the lower head's, and only a
        position that drafting did not reach reads that head again."""
        rows = self.rows
        n = rows * (width + 1)
        hidden = {layer: states[layer].reshape(n, -1) for layer in set(self.layers)}
        reuse = self.target.mode == "contrast" and self.target.lower == self.spec.draft_exit
        if reuse:
            upper = self.head_logits(hidden[self.layers[0]][None], [self.heads[0]])[0].view(rows, width + 1, -1)
            lower = draft_logits[: width + 1]
            if len(lower) == width:  # the last position was fed through blocks 1..L only for verification
                lower.append(self.head_logits(states[self.layers[1]][:, width][None], [self.heads[1]])[0])
            lower = torch.stack(lower, dim=1)
            logits = torch.stack([upper, lower]).view(2, n, -1)
        else:
            logits = self.head_logits(torch.stack([hidden[layer] for layer in self.layers]), self.heads)
        return self.target_scores(logits).view(rows, width + 1, -1)

    def accept_sampled(self, r: int, scores: torch.Tensor, drafts: list[int], draft_probs: list, n: int,
                       u: torch.Tensor) -> tuple[int, int]:
        """Row r under sampling: how many of its n drafts it keeps (accepting draft x with probability
        min(1, q(x)/p(x))), and the token that follows them (a draw from max(0, q - p) after a rejection, else the
        bonus draw from q). scores: [width + 1, V] target scores at the row's round positions."""
        s = self.sampling
        q = sampling_probs(scores, s.temperature, s.top_k, s.top_p)  # [width + 1, V]
        k = self.spec.draft_len
        for i in range(n):
            x = drafts[i]
            p = draft_probs[i][r]
            if float(u[r, k + i]) * float(p[x]) < float(q[i, x]):
                continue
            residual = (q[i] - p).clamp(min=0)
            if float(residual.sum()) <= 0:  # q == p up to rounding: any draw from q is exact
                residual = q[i]
            return i, int(sample_from_probs(residual[None], u[r, 2 * k: 2 * k + 1])[0])
        return n, int(sample_from_probs(q[n][None], u[r, 2 * k: 2 * k + 1])[0])


def generate_speculative(model: MultiExitGPT2, prompts, spec: SpeculativeConfig, target: DecodeConfig,
                         max_new_tokens: int, sampling: SamplingConfig, eos: int | None, backend: str,
                         return_cache: bool = False, on_token=None) -> GenerationResult:
    """Self-speculative generation (eager engine). Greedy output equals the target mode's full-depth greedy
    output; sampling keeps the target's distribution. on_token(tokens [n]) gets each row's tokens as emitted
    (row 0's, for streaming). Statistics land in `result.stats` and `result.drafted` (per token: drafted and
    accepted, or the target's own)."""
    prompts = check_prompts(prompts, model.config, max_new_tokens)
    run = SpeculativeRun(model, spec, target, left_pad(prompts, model.device), max_new_tokens, sampling, eos,
                         backend)
    last = run.prefill()
    streamed = 0
    while not all(run.finished):
        if on_token is not None:
            streamed = stream(on_token, run.tokens[0], streamed)
        last = run.round(last)
    if on_token is not None:
        stream(on_token, run.tokens[0], streamed)
    tokens = cut_at_eos(run.tokens, eos)
    drafted = [flags[: len(row)] for flags, row in zip(run.drafted_flags, tokens)]
    return GenerationResult(tokens=tokens, backend=backend, engine="eager", cache=run.cache if return_cache else None,
                            drafted=drafted, stats=speculative_stats(model, run, tokens))


def stream(on_token, row: list[int], done: int) -> int:
    for token in row[done:]:
        on_token(torch.tensor([token]))
    return len(row)


def speculative_stats(model: MultiExitGPT2, run: SpeculativeRun, tokens: list[list[int]]) -> dict:
    """Acceptance and the exact weight traffic per generated token, against full-depth decoding of the same
    target (which reads `depth` blocks and the target's heads once per token)."""
    c, st = model.config, run.stats
    elem = model.dtype.itemsize
    d, v, inner = c.n_embd, c.vocab_size, c.inner_dim
    block = (4 * d * d + 2 * d * inner + 9 * d + inner) * elem
    head = v * d * elem
    drafted, accepted, verifications = sum(st["drafted"]), sum(st["accepted"]), sum(st["verifications"])
    per_row_tokens = sum(map(len, tokens)) / len(tokens)
    spec_bytes = st["block_passes"] * block + st["head_passes"] * head
    full_bytes = per_row_tokens * (run.depth * block + len(set(run.heads)) * head)
    return {
        "draft_exit": run.spec.draft_exit, "draft_len": run.spec.draft_len, "draft_threshold": run.spec.draft_threshold,
        "rounds": st["rounds"], "drafted": drafted, "accepted": accepted, "verifications": verifications,
        "tokens_per_row": per_row_tokens,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_per_verification": (accepted + verifications) / verifications if verifications else None,
        "drafts_per_token": drafted / sum(map(len, tokens)),
        "block_passes": st["block_passes"], "head_passes": st["head_passes"],
        "weight_bytes_per_token": spec_bytes / per_row_tokens,
        "full_depth_weight_bytes_per_token": full_bytes / per_row_tokens,
        "weight_bytes_ratio": spec_bytes / full_bytes,
    }
