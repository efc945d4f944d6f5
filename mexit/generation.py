"""Prefill + token-by-token decoding for the fixed modes (original head, one exit, ACD) on the static cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import DecodeConfig, ModelConfig
from .heads import mode_logits, next_token_distribution
from .model import KVCache, MultiExitGPT2
from .sampling import SamplingConfig, row_uniforms, sample_from_scores


@dataclass
class GenerationResult:
    """tokens[b]: the new token ids of row b (ending at and including eos when it was produced).
    `backend` says which exit-stage path ran (torch / triton), `engine` which decode loop (eager / static /
    graph); `exit_layers`/`confidences` are filled by early exit."""

    tokens: list[list[int]]
    backend: str
    engine: str = "eager"
    text: list[str] | None = None
    exit_layers: list[list[int]] | None = None
    confidences: list[list[float]] | None = None
    stats: dict = field(default_factory=dict)
    cache: object = None  # the KVCache after generation, when asked for (tests, inspection)
    logits: list | None = None  # every step's [B, V] fp32 logits of the mode (ACD: log q), when asked for
    drafted: list[list[bool]] | None = None  # speculative: per token, drafted and accepted (else the target's)


@dataclass
class PaddedBatch:
    """Left-padded prompts. ids, positions: [B, P] int64; valid: [B, P] bool (False on padding)."""

    ids: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


def check_prompts(prompts, config: ModelConfig, max_new_tokens: int) -> list[list[int]]:
    """Validate token-id prompts: a non-empty batch of non-empty rows of ids in the vocabulary, fitting the
    context together with max_new_tokens."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not prompts:
        raise ValueError("no prompts were given")
    if isinstance(prompts[0], int):
        prompts = [prompts]
    prompts = [list(map(int, row)) for row in prompts]
    if any(len(row) == 0 for row in prompts):
        raise ValueError("empty prompt: every row needs at least one token")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    bad = sorted({t for row in prompts for t in row if not 0 <= t < config.vocab_size})
    if bad:
        raise ValueError(f"token ids {bad[:10]} are outside the vocabulary 0..{config.vocab_size - 1}")
    longest = max(map(len, prompts))
    if longest + max_new_tokens > config.n_positions:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {config.n_positions} positions")
    return prompts


def left_pad(prompts: list[list[int]], device) -> PaddedBatch:
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for b, row in enumerate(prompts):
        ids[b, longest - len(row):] = torch.tensor(row)
        valid[b, longest - len(row):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(ids.to(device), positions.to(device), valid.to(device))


def layer_of(head) -> int | None:
    return None if head == "original" else int(head)


class Decoder:
    """Owns the cache and positions of one batch; runs tokens through the layers the mode needs."""

    def __init__(self, model: MultiExitGPT2, batch: PaddedBatch, max_new_tokens: int, fused: bool = False):
        self.model = model
        self.fused = fused  # decode steps through the fused-linear kernels (the triton backend)
        self.prompt_len = batch.ids.shape[1]
        self.cache: KVCache = model.new_cache(batch.ids.shape[0], self.prompt_len + max_new_tokens)
        self.cache.valid[:, : self.prompt_len] = batch.valid
        self.batch = batch
        self.next_position = batch.positions[:, -1] + 1

    def prefill_input(self) -> tuple[torch.Tensor, int]:
        return self.model.embed(self.batch.ids, self.batch.positions), 0

    def step_input(self, tokens: torch.Tensor, step: int) -> tuple[torch.Tensor, int]:
        """Embed new tokens [B] for decode step `step` (0-based) and mark their slot valid."""
        slot = self.prompt_len + step
        self.cache.valid[:, slot] = True
        h = self.model.embed(tokens[:, None], self.next_position[:, None])
        self.next_position = self.next_position + 1
        return h, slot

    def run_to(self, h: torch.Tensor, slot: int, layers: list[int]) -> dict[int, torch.Tensor]:
        """Run h_0 [B, S, d] up to max(layers); return the last position's hidden state at each layer."""
        states = self.model.run_to(h, layers, self.cache, slot, fused=self.fused)
        return {layer: x[:, -1] for layer, x in states.items()}


def generate_tokens(model: MultiExitGPT2, prompts, decode: DecodeConfig, max_new_tokens: int,
                    sampling: SamplingConfig, eos_token_id: int | None, backend: str,
                    return_cache: bool = False, on_token=None, keep_logits: bool = False) -> GenerationResult:
    """Generate for original / exit / contrast modes. `backend` must already be resolved. on_token(tokens [B])
    is called with every step's tokens (streaming); keep_logits keeps every step's logits of the mode."""
    decode.validate_for(model.config)
    prompts = check_prompts(prompts, model.config, max_new_tokens)
    heads = decode.heads()
    layers = [layer_of(h) or model.config.n_layer for h in heads]
    decoder = Decoder(model, left_pad(prompts, model.device), max_new_tokens, fused=backend == "triton")
    chooser = TokenChooser(sampling, len(prompts), model.device, eos_token_id, max_new_tokens)
    h, slot = decoder.prefill_input()
    logits = [] if keep_logits else None
    for step in range(max_new_tokens):
        states = decoder.run_to(h, slot, layers)
        hidden = torch.stack([states[layer] for layer in layers])
        greedy, scores = next_token_distribution(model, decode, hidden, backend, need_scores=sampling.do_sample)
        if keep_logits:
            logits.append(mode_logits(model, decode, hidden, backend))
        tokens = chooser.choose(greedy, scores)
        if on_token is not None:
            on_token(tokens)
        if step == max_new_tokens - 1 or chooser.all_finished():
            break
        h, slot = decoder.step_input(tokens, step)
    return GenerationResult(tokens=chooser.rows(), backend=backend, cache=decoder.cache if return_cache else None,
                            logits=logits)


class TokenChooser:
    """Greedy or seeded sampling (one random stream per row, `row_uniforms`); tracks which rows have produced eos
    (later tokens of such a row are eos)."""

    def __init__(self, sampling: SamplingConfig, batch: int, device, eos_token_id: int | None, max_new_tokens: int):
        self.sampling, self.eos = sampling, eos_token_id
        self.uniforms = row_uniforms(sampling.seed, batch, max_new_tokens, device) if sampling.do_sample else None
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.history: list[torch.Tensor] = []

    def uniform(self) -> torch.Tensor:
        """[batch] uniform numbers of this step (one per row, from the row's own stream)."""
        return self.uniforms[len(self.history)]

    def pick(self, greedy: torch.Tensor, scores: torch.Tensor | None, uniform: torch.Tensor | None) -> torch.Tensor:
        """Greedy tokens, or tokens sampled from scores [b, V] with this step's uniform numbers [b]."""
        s = self.sampling
        if not s.do_sample:
            return greedy
        return sample_from_scores(scores, uniform, s.temperature, s.top_k, s.top_p)

    def choose(self, greedy: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        uniform = self.uniform() if self.sampling.do_sample else None
        return self.record(self.pick(greedy, scores, uniform))

    def record(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append this step's tokens [B]; rows that already produced eos get eos."""
        if self.eos is not None:
            tokens = torch.where(self.finished, self.eos, tokens)
            self.finished |= tokens == self.eos
        self.history.append(tokens)
        return tokens

    def all_finished(self) -> bool:
        return self.eos is not None and bool(self.finished.all())

    def rows(self) -> list[list[int]]:
        return cut_at_eos(torch.stack(self.history, dim=1).tolist(), self.eos)


def cut_at_eos(table: list[list[int]], eos: int | None) -> list[list[int]]:
    """Each row up to and including its first eos."""
    if eos is None:
        return table
    return [row[: row.index(eos) + 1] if eos in row else row for row in table]
