"""Per-layer predictions ("logit lens" through a multi-exit checkpoint's trained heads): what every exit head and the
original head predict at every position of a prompt, from one pass through the blocks."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from mexit.model.decoder import MultiExitGPT2


@dataclass
class LayerPredictions:
    """One prompt's predictions. H heads (the exits in layer order, then "original"), T prompt positions; position t
    predicts token t + 1.

    heads: [H] exit layer numbers, then "original"; layers: [H] the layer each head reads (original: n_layer);
    input_ids: [T]; tokens: int64 [H, T, k] top-k token ids, most probable first; logprobs: float32 [H, T, k]
    their log-probabilities (natural log); entropy: float32 [H, T] of each head's distribution, in nats."""

    heads: list
    layers: list[int]
    input_ids: list[int]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor

    def to_dict(self, decode=None) -> dict:
        """Plain lists for JSON; decode (ids -> text) adds each token's text."""
        out = {"heads": self.heads, "layers": self.layers, "input_ids": self.input_ids,
               "tokens": self.tokens.tolist(), "logprobs": self.logprobs.tolist(), "entropy": self.entropy.tolist()}
        if decode is not None:
            out["input_text"] = [decode([i]) for i in self.input_ids]
            out["token_text"] = [[[decode([i]) for i in position] for position in head] for head in out["tokens"]]
        return out


@torch.inference_mode()
def layer_predictions(model: MultiExitGPT2, ids: list[int], top_k: int = 5) -> LayerPredictions:
    """The predictions of every exit head (ln_f then the head, as the checkpoint's exits are trained) and of the
    original head at every position of `ids` (a non-empty list of token ids within the context), from one pass over
    the blocks; logits in fp32. Raises ValueError for an empty or too-long prompt or top_k not an int in 1..vocab."""
    config = model.config
    if not ids:
        raise ValueError("empty prompt: layer predictions need at least one token")
    if len(ids) > config.n_positions:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds the context ({config.n_positions})")
    try:  # an int, a numpy or torch integer; not a bool, float or string
        k = None if isinstance(top_k, bool) else operator.index(top_k)
    except TypeError:
        k = None
    if k is None or not 1 <= k <= config.vocab_size:
        raise ValueError(f"top_k must be an int in 1..{config.vocab_size}, got {top_k!r}")
    top_k = k
    heads = [*config.exit_layers, "original"]
    layers = [model.layer_of(head) for head in heads]
    x = torch.tensor([ids], device=model.device)
    states = model.forward(x, layers)[1]
    tokens, logprobs, entropy = [], [], []
    for head, layer in zip(heads, layers):
        logp = torch.log_softmax(model.head_logits(states[layer][0], head), dim=-1)  # [T, V] fp32
        top = logp.topk(top_k, dim=-1)
        tokens.append(top.indices)
        logprobs.append(top.values)
        entropy.append(-(logp.exp() * logp).sum(-1))
    return LayerPredictions(heads, layers, list(ids), torch.stack(tokens).cpu(), torch.stack(logprobs).cpu(),
                            torch.stack(entropy).cpu())
