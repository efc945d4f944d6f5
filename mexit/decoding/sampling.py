"""Token choice from a next-token distribution: greedy, or sampling driven by uniform numbers passed in.

Passing the random numbers in (rather than drawing inside) keeps a step free of generator state, so the same
code can be captured in a CUDA graph and a seeded run repeats exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """do_sample=False is greedy. top_k=0 and top_p=1.0 switch those filters off. With both, top-p keeps the
    smallest prefix of the whole distribution (by descending probability) whose mass reaches top_p, intersected
    with the top k; top_p_after_top_k=True applies top-p to the top k renormalized instead (transformers' processor
    order: temperature, top-k, top-p)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | tuple[int, ...] | None = None  # one seed for every row, or one per row
    top_p_after_top_k: bool = False
    repetition_penalty: float = 1.0  # transformers' RepetitionPenaltyLogitsProcessor on the mode's scores
    no_repeat_ngram_size: int = 0  # transformers' NoRepeatNGramLogitsProcessor (0: off)

    def __post_init__(self):
        for name in ("do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty",
                     "no_repeat_ngram_size"):  # numpy / torch values as Python ones (mexit.values.plain)
            value = getattr(self, name)
            value = value.tolist() if hasattr(value, "tolist") else value
            if isinstance(value, (list, tuple)):
                value = tuple(v.tolist() if hasattr(v, "tolist") else v for v in value)
            object.__setattr__(self, name, value)
        for seed in self.seed if isinstance(self.seed, tuple) else (self.seed,):
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
                raise ValueError(f"seed must be an integer in [0, 2**63 - 1] (one, or one per prompt), got {seed!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if int(self.no_repeat_ngram_size) != self.no_repeat_ngram_size or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size}")

    @property
    def controls_repetition(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0


def row_uniforms(seed: int | tuple[int, ...] | None, rows: int, count: int, device) -> torch.Tensor:
    """[rows, count] uniform numbers, one stream per row: row r draws its numbers from its own generator seeded
    with seed (or seed[r]), so a row samples the same tokens alone and in any batch. seed None: unseeded."""
    if isinstance(seed, tuple):
        if len(seed) != rows:
            raise ValueError(f"{len(seed)} seeds for {rows} prompts: pass one seed, or one per prompt")
        seeds = list(seed)
    else:
        seeds = [seed] * rows
    out = torch.empty(rows, count, device=device)
    for r, row_seed in enumerate(seeds):
        gen = None if row_seed is None else torch.Generator(device=device).manual_seed(int(row_seed))
        out[r] = torch.rand(count, generator=gen, device=device)
    return out


def choose(greedy: torch.Tensor, scores: torch.Tensor | None, sampling: SamplingConfig,
           uniform: torch.Tensor | None) -> torch.Tensor:
    """The token chooser of every mode and engine: the greedy tokens [B], or a draw from scores [B, V] (logits or
    log-probabilities) after temperature / top-k / top-p with one uniform number per row ([B] in [0, 1))."""
    if not sampling.do_sample:
        return greedy
    return sample_from_probs(sampling_probs(scores, sampling), uniform)


def sampling_probs(scores: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """[..., V] logits or log-probabilities -> the fp32 distribution `choose` draws from: softmax after temperature,
    zero outside top-k / top-p (`kept_tokens`), renormalized."""
    probs = torch.softmax(scores.float() / sampling.temperature, dim=-1)
    if not sampling.top_k and sampling.top_p >= 1.0:
        return probs
    kept = torch.where(kept_tokens(probs, sampling), probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def kept_tokens(probs: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """[..., V] bool in vocabulary order: the tokens top-k / top-p keep: the k most likely, and the smallest prefix
    by descending probability (ties in index order) whose mass reaches top_p, of the whole distribution or, with
    top_p_after_top_k, of the top k renormalized (transformers' order)."""
    top_k, top_p = sampling.top_k, sampling.top_p
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_k:
        keep[..., top_k:] = False
    if top_p < 1.0:
        mass = sorted_probs
        if top_k and sampling.top_p_after_top_k:
            mass = torch.where(keep, sorted_probs, 0.0)
            mass = mass / mass.sum(-1, keepdim=True)
        keep &= (mass.cumsum(-1) - mass) < top_p
    return torch.zeros_like(keep).scatter(-1, order, keep)


def sample_from_probs(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw in index order: probs [B, V] (need not be normalized), uniform [B] in [0, 1) -> [B] int64.
    Never a zero-probability token; NaN rows (a predicated head no kept value reads) still give a valid index."""
    cdf = probs.float().cumsum(-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    # never land on a zero-probability token through rounding at the top edge
    last_nonzero = probs.shape[-1] - 1 - (probs.flip(-1) > 0).float().argmax(-1, keepdim=True)
    return torch.minimum(pick, last_nonzero).squeeze(-1)
