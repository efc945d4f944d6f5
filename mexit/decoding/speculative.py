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
A row drafts at most as many tokens as its budget can still keep.

The roles are separate (as in LayerSkip and vLLM): `draft_step` proposes (a draft per call, one position per
row), `verify` scores every position with the target and accepts (`accept_greedy`, `accept_sampled`). Every
tensor keeps a fixed shape: the draft step is one piece replayed per draft, verification one piece over
draft_len + 1 positions (a row's positions past its drafts are computed and discarded), so the graph engine
captures three graphs; the host reads one flag per draft only with a draft threshold, and the rows' counts once
per round. The eager engine runs the same pieces uncaptured.

The target is any fixed mode: the original head, an exit, or ACD (upper, lower). With ACD and drafts from its
lower exit, the drafts' logits are the lower exit's logits at those positions and are reused.

The repetition controls (`ops.control_repetition`) apply to every draft's logits and to the target's scores at every
round position, each on the row's sequence up to that position (the round's drafts are written into the
sequence as they are made): the target's scores are then exactly its own step's, so the output stays identical
(greedy) or distributed as the target's (sampling: p is the controlled draft distribution).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from mexit import ops
from mexit.model.token_counts import draft_vocabulary
from mexit.values import plain_fields

from .heads import DecodeConfig, ModeScores
from .sampling import sample_from_probs, sampling_probs
from .step import Mode, Rows

if TYPE_CHECKING:
    from mexit.model.config import ModelConfig
    from mexit.model.decoder import MultiExitGPT2


@dataclass(frozen=True)
class SpeculativeConfig:
    """draft_exit: the exit layer whose head drafts (below the target's depth); draft_len: drafts per round at most;
    draft_threshold: stop a row's drafting at a draft whose top probability is below it (None: never);
    draft_vocab: draft from the draft exit's head restricted to the checkpoint's draft_vocab most frequent tokens
    (FR-Spec, Zhao et al. 2025; its `token_counts.safetensors`): a draft reads draft_vocab / V of the head, the
    draft distribution is the restricted one (draft_threshold then applies to its top probability, renormalized
    over the N tokens), and verification keeps the output exact. The default draft_len=1 is the cheapest setting
    measured on the small real model (bench/RESULTS.md): each draft reads its exit head, so longer drafts pay
    only with high acceptance."""

    draft_exit: int
    draft_len: int = 1
    draft_threshold: float | None = None
    draft_vocab: int | None = None

    def __post_init__(self):
        plain_fields(self)
        if isinstance(self.draft_exit, bool) or not isinstance(self.draft_exit, int):
            raise ValueError(f"draft_exit must be an exit layer number, got {self.draft_exit!r}")
        if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or self.draft_len < 1:
            raise ValueError(f"draft_len must be an integer >= 1, got {self.draft_len!r}")
        if self.draft_threshold is not None and not 0.0 <= self.draft_threshold <= 1.0:
            raise ValueError(f"draft_threshold must be in [0, 1], got {self.draft_threshold}")
        if self.draft_vocab is not None and (isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int)
                                             or self.draft_vocab < 2):
            raise ValueError(f"draft_vocab must be an integer >= 2 (tokens), got {self.draft_vocab!r}")

    def check(self, config: ModelConfig, target: DecodeConfig) -> None:
        """Against a checkpoint and the target (ValueError): the draft exit is one of its exits, below the target's
        depth; draft_vocab fits the vocabulary. The token counts draft_vocab reads are checked where the mode is
        built (they live beside the weights)."""
        if self.draft_exit not in config.exit_layers:
            raise ValueError(f"draft exit {self.draft_exit} is not in this checkpoint; its exits are "
                             f"{list(config.exit_layers) or 'none'}")
        depth = target.depth(config)
        if self.draft_exit >= depth:
            raise ValueError(f"draft exit {self.draft_exit} must sit below the target's depth ({depth} layers): a "
                             "draft as deep as its target saves nothing")
        if self.draft_vocab is not None and self.draft_vocab > config.vocab_size:
            raise ValueError(f"draft_vocab {self.draft_vocab} exceeds the vocabulary ({config.vocab_size})")


@dataclass(frozen=True)
class Speculation:
    """What the loop runs: drafts of `spec` verified against the fixed mode `target`."""

    spec: SpeculativeConfig
    target: DecodeConfig

    def check(self, config: ModelConfig) -> None:
        """The target's check, then the drafts' against it (ValueError)."""
        self.target.check(config)
        self.spec.check(config, self.target)


class Target(Protocol):
    """What a round verifies against: the fixed mode of `Speculation.target` (`fixed.FixedMode`), built by the
    registry. layers: its heads' layers in `settings.heads()` order; stops: those layers sorted, once each; depth:
    the deepest; full_heads: heads a step reads; run: its own step (the prompt's); scores: its heads' states ->
    `ModeScores`."""

    settings: DecodeConfig
    layers: list[int]
    stops: list[int]
    depth: int
    full_heads: int

    def run(self, rows: Rows) -> None: ...

    def scores(self, hidden, backend: ops.Backend, scores: bool = False, logits: bool = False) -> ModeScores: ...


@dataclass
class RoundBuffers:
    """One batch's speculative state (B rows, k = draft_len, V vocabulary, T output columns and rounds). x [B] int64:
    the next token to feed; draft_i [1] int64: drafts made this round; drafts [B, k] int64; draft_logits [k + 1, B,
    V] fp32 (the draft exit's logits per position, when ACD's lower exit drafts); draft_probs [k, B, V] fp32
    (sampling: the draft distributions); proposing [B] bool, any_proposing [1] bool, n_drafts [B] int64; count [B]
    int64: tokens emitted per row; saved {layer: [B, k + 1, d]}: states of the draft exit's layers at the round's
    positions; streams [T, B, 2k + 1] fp32: each round's uniform numbers per row (sampling); round [1] int64;
    drafted [B, T] bool: per emitted token, a draft the target kept; drafted_total / accepted / verifications [B]
    int64. Host side: remaining (each unfinished row's token budget left, as last read)."""

    x: torch.Tensor
    draft_i: torch.Tensor
    drafts: torch.Tensor
    draft_logits: torch.Tensor | None
    draft_probs: torch.Tensor | None
    proposing: torch.Tensor
    any_proposing: torch.Tensor
    n_drafts: torch.Tensor
    count: torch.Tensor
    saved: dict
    streams: torch.Tensor | None
    round: torch.Tensor
    drafted: torch.Tensor
    drafted_total: torch.Tensor
    accepted: torch.Tensor
    verifications: torch.Tensor
    remaining: list | None = None
    counts: list | None = None
    unfinished: list | None = None


class Speculative(Mode):
    """Self-speculative decoding of a fixed mode: the prompt's step is the target's own, then a round per step."""

    emits_one_per_step = False

    def reference(self, config) -> tuple[int, int]:
        """Lossless speculation saves against its target: the target at full depth."""
        return self.target.depth, self.target.full_heads

    def __init__(self, model: MultiExitGPT2, speculation: Speculation, target: Target):
        """target: the mode of speculation.target on `model`. Errors (ValueError): settings the checkpoint cannot
        run; draft_vocab without the checkpoint's token counts."""
        speculation.check(model.config)
        spec = speculation.spec
        if spec.draft_vocab is not None and model.token_counts is None:
            raise ValueError("draft_vocab needs the checkpoint's token frequencies (token_counts.safetensors): count "
                             "them with `mexit count-tokens --model FOLDER --data TEXT`")
        self.model, self.spec, self.settings, self.target = model, spec, speculation, target
        self.depth = target.depth
        self.draft_exit, self.k = spec.draft_exit, spec.draft_len
        layers = self.target.layers
        self.low_layers = sorted({layer for layer in layers if layer < self.draft_exit} | {self.draft_exit})
        self.high_layers = sorted({layer for layer in layers if layer > self.draft_exit})
        self.draft_ids, self.draft_weight = None, model.head_weight(self.draft_exit)
        if spec.draft_vocab is not None:  # the head's rows of the most frequent tokens, gathered once
            self.draft_ids = draft_vocabulary(model.token_counts, spec.draft_vocab).to(model.device)
            self.draft_weight = self.draft_weight.index_select(0, self.draft_ids)
        self.draft_share = self.draft_weight.shape[0] / model.config.vocab_size  # of a head, read per draft
        # drafts' logits are ACD's lower ones (not with a restricted draft head)
        decode = speculation.target
        self.reuse = decode.mode == "contrast" and decode.lower == self.draft_exit and self.draft_ids is None
        self.stops = self.target.stops
        self.full_heads = self.target.full_heads

    def slots(self, prompt_len: int, max_new_tokens: int) -> int:
        """Cache slots a batch may use: a round takes at most draft_len + 1 and emits at least one token per
        unfinished row."""
        return prompt_len + (max_new_tokens - 1) * (self.k + 1) + 1

    def columns(self, max_new_tokens: int) -> int:
        """A round writes draft_len + 1 columns from a row's count on (the unkept ones rewritten unchanged)."""
        return max_new_tokens + self.k + 1

    def streams_needed(self, max_new_tokens: int) -> int:
        """Uniform numbers per row: the first token's, then 2 * draft_len + 1 per round."""
        return 1 + (max_new_tokens - 1) * (2 * self.k + 1)

    def buffers(self, rows: Rows) -> RoundBuffers:
        b, k, t, dev = rows.rows, self.k, rows.steps, self.model.device
        d, v = self.model.config.n_embd, self.model.config.vocab_size
        long = dict(dtype=torch.long, device=dev)
        sampling = rows.sampling.do_sample
        return RoundBuffers(
            x=torch.zeros(b, **long), draft_i=torch.zeros(1, **long), drafts=torch.zeros(b, k, **long),
            draft_logits=torch.zeros(k + 1, b, v, device=dev) if self.reuse else None,
            draft_probs=torch.zeros(k, b, v, device=dev) if sampling else None,
            proposing=torch.zeros(b, dtype=torch.bool, device=dev),
            any_proposing=torch.zeros(1, dtype=torch.bool, device=dev), n_drafts=torch.zeros(b, **long),
            count=torch.zeros(b, **long),
            saved={layer: torch.zeros(b, k + 1, d, dtype=self.model.dtype, device=dev) for layer in self.low_layers},
            streams=torch.zeros(t, b, 2 * k + 1, device=dev) if sampling else None, round=torch.zeros(1, **long),
            drafted=torch.zeros(b, t, dtype=torch.bool, device=dev), drafted_total=torch.zeros(b, **long),
            accepted=torch.zeros(b, **long), verifications=torch.zeros(b, **long))

    def start(self, rows: Rows, streams: torch.Tensor | None) -> None:
        """After the target emitted token 0: every row has one token; the rounds' uniform numbers follow the
        first in each row's stream."""
        buf, io = rows.buffers, rows.io
        buf.count.fill_(1)
        buf.x.copy_(io.tokens)
        buf.proposing.copy_(~io.finished)
        buf.n_drafts.zero_()
        buf.draft_i.zero_()
        buf.round.zero_()
        buf.drafted.zero_()
        for t in (buf.drafted_total, buf.accepted, buf.verifications):
            t.zero_()
        if streams is not None:
            rounds = (streams.shape[1] - 1) // (2 * self.k + 1)
            per_round = streams[:, 1: 1 + rounds * (2 * self.k + 1)].reshape(streams.shape[0], rounds, -1)
            buf.streams.zero_()
            buf.streams[:rounds, : streams.shape[0]] = per_round.transpose(0, 1)
        self.read_counts(rows)

    def read_counts(self, rows: Rows) -> None:
        """One host read: every row's token count and whether it finished."""
        buf, n = rows.buffers, rows.real_rows
        values = rows.read(torch.cat([buf.count[:n], rows.io.finished[:n].long()]))
        buf.counts = values[:n]
        buf.unfinished = [not f and c < rows.max_new_tokens for c, f in zip(buf.counts, values[n:])]
        buf.remaining = [rows.max_new_tokens - c for c, u in zip(buf.counts, buf.unfinished) if u]

    # ---- the round ----
    def run(self, rows: Rows) -> None:
        if rows.prefilling:
            self.target.run(rows)
            return
        buf, c, k = rows.buffers, rows.counters, self.k
        limit = min(k, max(buf.remaining) - 1)  # drafts the budget of the row with the most left can keep
        steps, completed = 0, True
        for _ in range(limit):
            rows.launch("draft", functools.partial(self.draft_step, rows))
            steps += 1
            c["weight_blocks"] += self.draft_exit
            c["weight_heads"] += self.draft_share
            if self.spec.draft_threshold is not None and not rows.read(buf.any_proposing)[0]:
                completed = False  # no row proposes any more: the last draft is not verified
                break
        if completed:  # the last position to verify has not been through blocks 1..L yet
            rows.launch("lower", functools.partial(self.lower_step, rows))
            c["weight_blocks"] += self.draft_exit
            c["weight_heads"] += self.reuse
        rows.launch("verify", functools.partial(self.verify, rows))
        c["weight_blocks"] += self.depth - self.draft_exit
        c["weight_heads"] += self.target.full_heads - self.reuse
        self.read_counts(rows)

    def pieces(self, rows: Rows) -> dict:
        return {name: functools.partial(fn, rows) for name, fn in
                (("draft", self.draft_step), ("lower", self.lower_step), ("verify", self.verify))}

    def lower_pass(self, rows: Rows, index: torch.Tensor) -> torch.Tensor:
        """Feed buffers.x at round position `index` ([1] int64) through blocks 1..L, keeping each low layer's
        states at that position; returns h_L [B, d]."""
        buf = rows.buffers
        states = rows.feed(buf.x, index, self.low_layers)
        for layer, h in states.items():
            buf.saved[layer].index_copy_(1, index, h)
        return states[self.draft_exit][:, 0]

    def draft_head(self, rows: Rows, h: torch.Tensor, index: torch.Tensor):
        """The draft head on h [B, d] (restricted to the draft vocabulary: its logits, argmax and probabilities
        over those tokens only)."""
        out = self.model.exit_stage([h], [self.draft_weight], rows.backend)
        if self.reuse:
            rows.buffers.draft_logits.index_copy_(0, index, out.logits)
        return out

    def draft_logits(self, out, full: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits [B, V] fp32 with -inf outside a restricted draft vocabulary, when `full` (sampling, the
        repetition controls) else None; argmax [B] int64 token ids)."""
        if self.draft_ids is None:
            return out.logits[0], out.argmax[0]
        if not full:
            return None, self.draft_ids[out.argmax[0]]
        logits = out.logits.new_full((out.logits.shape[1], self.model.config.vocab_size), -float("inf"))
        return logits.index_copy_(1, self.draft_ids, out.logits[0]), self.draft_ids[out.argmax[0]]

    def draft_step(self, rows: Rows) -> None:
        """Propose: one draft per row at the next round position, and who still proposes."""
        buf, s, controlled = rows.buffers, rows.sampling, rows.history is not None
        i = buf.draft_i
        out = self.draft_head(rows, self.lower_pass(rows, i), i)
        logits, top1 = self.draft_logits(out, s.do_sample or controlled)
        if controlled:
            logits = rows.penalize(logits, rows.io.positions + i)
        if s.do_sample:
            probs = sampling_probs(logits, s)
            uniform = buf.streams.index_select(0, buf.round)[0]
            draft = sample_from_probs(probs, uniform.index_select(1, i)[:, 0])
            confidence = probs.max(-1).values
            buf.draft_probs.index_copy_(0, i, probs[None])
        elif controlled:
            draft, confidence = logits.argmax(-1), logits.softmax(-1).max(-1).values
        else:
            draft, confidence = top1, out.max_prob[0]
        if controlled:  # the draft's position in the row's sequence: later drafts and verification see it
            rows.remember(draft, rows.io.positions + i + 1)
        proposing = buf.proposing & (i < rows.max_new_tokens - buf.count - 1)  # the budget can keep it
        if self.spec.draft_threshold is not None:
            proposing &= confidence >= self.spec.draft_threshold
            buf.any_proposing.copy_(proposing.any()[None])
        buf.proposing.copy_(proposing)
        buf.n_drafts.add_(proposing)
        buf.drafts.index_copy_(1, i, draft[:, None])
        buf.x.copy_(draft)
        buf.draft_i.add_(1)

    def lower_step(self, rows: Rows) -> None:
        """Blocks 1..L for the round's last position (its draft was made but never fed)."""
        i = rows.buffers.draft_i
        h = self.lower_pass(rows, i)
        if self.reuse:
            self.draft_head(rows, h, i)

    def verify(self, rows: Rows) -> None:
        """Score: the target at every round position in one pass; accept per row; emit; set the next round up."""
        buf, io = rows.buffers, rows.io
        b, k1 = rows.rows, self.k + 1
        states = {**buf.saved, **rows.run_round(buf.saved[self.draft_exit], self.draft_exit, self.high_layers)}
        hidden = [states[layer].reshape(b * k1, -1) for layer in self.target.layers]
        sampling, controlled = rows.sampling.do_sample, rows.history is not None
        if self.reuse:
            choice, scores = self.reuse_scores(rows, hidden[0], sampling or controlled)
        elif controlled:  # the controls act on the target's logits (ACD: log q), as in its own step
            out = self.target.scores(hidden, rows.backend, logits=True)
            choice, scores = out.token, out.logits
        else:
            out = self.target.scores(hidden, rows.backend, scores=sampling)
            choice, scores = out.token, out.scores
        if controlled:  # round position j follows the row's position + j (its drafts are in the history)
            positions = io.positions[:, None] + torch.arange(k1, device=io.positions.device)
            scores = rows.penalize(scores.view(b, k1, -1), positions).view(b * k1, -1)
            choice = scores.argmax(-1)
        choice = choice.view(b, k1)
        if sampling:
            accepted, token = accept_sampled(scores.view(b, k1, -1), buf, rows.sampling)
        else:
            accepted, token = accept_greedy(choice, buf)
        self.emit(rows, accepted, token)

    def reuse_scores(self, rows: Rows, upper: torch.Tensor, with_logprobs: bool):
        """ACD whose lower exit drafts: the upper head at every position, the drafts' logits as the lower's."""
        target = self.target.settings
        up = self.model.exit_stage([upper], [target.upper], rows.backend)
        low = rows.buffers.draft_logits.transpose(0, 1).reshape(up.logits.shape[1], -1)
        both = ops.ExitHeadOutput(logits=torch.stack([up.logits[0], low]),
                              lse=torch.stack([up.lse[0], torch.logsumexp(low, -1)]), max_prob=up.max_prob,
                              margin=up.margin, argmax=up.argmax,
                              max_logit=torch.stack([up.max_logit[0], low.max(-1).values]))
        return ops.acd_contrast(both, target.alpha, target.min_candidates, rows.backend, with_logprobs=with_logprobs)

    def emit(self, rows: Rows, accepted: torch.Tensor, token: torch.Tensor) -> None:
        """Accept: each unfinished row keeps its accepted drafts and the target's token (`Rows.emit_round`); then the
        round's statistics and the next round's drafting state."""
        buf = rows.buffers
        running = (~rows.emit_round(accepted, token, buf.drafts, buf.n_drafts, buf.draft_i, buf.count,
                                    buf.drafted)).long()
        buf.drafted_total.add_(buf.n_drafts * running)
        buf.accepted.add_(accepted * running)
        buf.verifications.add_(running)
        buf.x.copy_(token)
        buf.proposing.copy_(~rows.io.finished)
        buf.n_drafts.zero_()
        buf.draft_i.zero_()
        buf.round.add_(1)

    # ---- results ----
    def more(self, rows: Rows, check_every: int) -> bool:
        return bool(rows.buffers.remaining)

    def stream(self, rows: Rows, on_token, done: int) -> int:
        """The positions every unfinished row has reached, one [B] tensor each (finished rows read eos)."""
        buf = rows.buffers
        complete = min((c for c, u in zip(buf.counts, buf.unfinished) if u), default=max(buf.counts))
        for t in range(done, complete):
            on_token(rows.io.out[: rows.real_rows, t])
        return max(done, complete)

    def tokens(self, rows: Rows) -> list[list[int]]:
        out = rows.io.out[: rows.real_rows].tolist()
        return [row[:n] for row, n in zip(out, rows.buffers.counts)]

    def describe(self, rows: Rows, result) -> None:
        buf, n = rows.buffers, rows.real_rows
        flags = buf.drafted[:n].tolist()
        result.drafted = [f[: len(t)] for f, t in zip(flags, result.tokens)]
        drafted, accepted, verifications = (int(t[:n].sum()) for t in (buf.drafted_total, buf.accepted,
                                                                        buf.verifications))
        total = sum(map(len, result.tokens))
        st = result.stats
        st.update(rounds=st["steps"], draft_exit=self.spec.draft_exit, draft_len=self.spec.draft_len,
                  draft_threshold=self.spec.draft_threshold, draft_vocab=self.spec.draft_vocab, drafted=drafted,
                  accepted=accepted,
                  verifications=verifications, tokens_per_row=total / n,
                  acceptance_rate=accepted / drafted if drafted else None,
                  tokens_per_verification=(accepted + verifications) / verifications if verifications else None,
                  drafts_per_token=drafted / total)


def accept_greedy(choice: torch.Tensor, buf: RoundBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept: the longest prefix of each row's drafts that equals the target's choices [B, k + 1], and the
    target's token after it: (accepted [B] int64, token [B] int64)."""
    k = buf.drafts.shape[1]
    j = torch.arange(k, device=choice.device)
    match = (buf.drafts == choice[:, :k]) & (j < buf.n_drafts[:, None])
    accepted = match.long().cumprod(-1).sum(-1)
    return accepted, choice.gather(1, accepted[:, None])[:, 0]


def accept_sampled(scores: torch.Tensor, buf: RoundBuffers, sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept draft x with probability min(1, q(x)/p(x)) in order; at the first rejection draw from
    max(0, q - p) normalized, after all accepted from q (Leviathan et al. 2023). scores [B, k + 1, V] target
    scores; p: the drafts' distributions; the round's uniform numbers: [k, 2k) for the tests, 2k for the draw."""
    b, k1, v = scores.shape
    k = k1 - 1
    q = sampling_probs(scores, sampling)
    p = buf.draft_probs.transpose(0, 1)  # [B, k, V]
    u = buf.streams.index_select(0, buf.round)[0]  # [B, 2k + 1]
    drafts = buf.drafts[..., None]
    px, qx = p.gather(-1, drafts)[..., 0], q[:, :k].gather(-1, drafts)[..., 0]
    j = torch.arange(k, device=scores.device)
    keep = (u[:, k: 2 * k].double() * px.double() < qx.double()) & (j < buf.n_drafts[:, None])
    accepted = keep.long().cumprod(-1).sum(-1)
    q_at = q.gather(1, accepted[:, None, None].expand(b, 1, v))[:, 0]
    p_at = p.gather(1, accepted.clamp(max=k - 1)[:, None, None].expand(b, 1, v))[:, 0]
    residual = (q_at - p_at).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, q_at)  # q == p up to rounding
    rejected = accepted < buf.n_drafts
    token = sample_from_probs(torch.where(rejected[:, None], residual, q_at), u[:, 2 * k])
    return accepted, token
