"""DoLa (Chuang et al., ICLR 2024: Decoding by Contrasting Layers) as transformers 4.51.3 ran it
(`generation/utils.py`: `_dola_decoding`, `_dola_select_contrast`, `_relative_top_filter`), and a multi-exit variant
whose premature distributions come from the checkpoint's trained exit heads.

Per step: the final distribution is the original head's; each candidate premature layer L gives logits from the
output embedding applied to the raw output of block L (no final layernorm; layer 0 is the embeddings), or with
`heads="exit"` from exit head L after ln_f. Among several candidates the one with the largest Jensen-Shannon
divergence from the final distribution is taken; the scores are log_softmax(final) - log_softmax(premature) on the
tokens whose final probability is at least `relative_top` times the largest (the others -inf). Greedy takes their
argmax, sampling samples them. Each row picks its own premature layer; `per_batch` picks one for the whole batch
from the mean divergence over its rows, as transformers did (the same for a single row)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mexit.values import plain_fields

from .step import OneStep, Rows

if TYPE_CHECKING:
    from mexit.model.config import ModelConfig
    from mexit.model.decoder import MultiExitGPT2


@dataclass(frozen=True)
class DolaConfig:
    """layers: "low", "high" or candidate layer numbers (transformers' `dola_layers`); heads: "embedding" (the
    output embedding on raw block outputs, as transformers) or "exit" (the checkpoint's exit heads, after ln_f);
    relative_top: the plausibility filter's share of the top probability (transformers' fixed 0.1); per_batch:
    one premature layer for all rows from their mean divergence, as transformers chose it (rows still running;
    transformers also counts finished rows, fed padding), instead of one per row."""

    layers: str | tuple = "high"
    heads: str = "embedding"
    relative_top: float = 0.1
    per_batch: bool = False  # transformers' rule: one premature layer for the batch (the drop-in)

    def __post_init__(self):
        plain_fields(self)
        if isinstance(self.layers, str):
            if self.layers not in ("low", "high"):
                raise ValueError(f"dola_layers must be 'low', 'high' or a list of layers, got {self.layers!r}")
        else:
            layers = tuple(self.layers)
            if not layers or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
                raise ValueError(f"dola_layers must be 'low', 'high' or a list of layer numbers >= 0, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"dola_layers lists a layer twice: {list(layers)}")
            object.__setattr__(self, "layers", layers)
        if self.heads not in ("embedding", "exit"):
            raise ValueError(f"dola_heads must be 'embedding' or 'exit', got {self.heads!r}")
        if not 0.0 < self.relative_top <= 1.0:
            raise ValueError(f"relative_top must be in (0, 1], got {self.relative_top}")

    def check(self, config: ModelConfig) -> None:
        """Against a checkpoint (ValueError): some candidate layer exists (`candidates`)."""
        self.candidates(config)

    def candidates(self, config: ModelConfig) -> list[int]:
        """The candidate premature layers, by transformers 4.51.3's rules (`_dola_decoding`): "low" / "high" are
        every second layer of the lower / upper half from a start layer (2 with tied embeddings and more than two
        layers; 0 when untied), at most 20 layers' span past 40 layers; a list keeps its layers below the last one.
        With heads="exit", "low" / "high" are the exits in that half and a list must name exits."""
        final = config.n_layer
        if self.heads == "exit":
            exits = [x for x in config.exit_layers if x < final]
            if self.layers == "low":  # transformers' halves: low below final // 2, high from it
                chosen = [x for x in exits if x < final // 2]
            elif self.layers == "high":
                chosen = [x for x in exits if x >= final // 2]
            else:
                missing = [x for x in self.layers if x not in exits]
                if missing:
                    raise ValueError(f"dola_heads='exit': layers {missing} have no exit head below the last layer; "
                                     f"this checkpoint's are {exits or 'none'}")
                chosen = list(self.layers)
            if not chosen:
                raise ValueError(f"dola_heads='exit', dola_layers={self.layers!r}: no exit head in that range "
                                 f"(exits {list(config.exit_layers)})")
            return chosen
        start = 0 if not config.tie_word_embeddings else 2 if final > 2 else 1 if final == 2 else 0
        if self.layers == "low":
            if start == final // 2:
                return [start]
            return list(range(start, final // 2, 2)) if final <= 40 else list(range(start, 20, 2))
        if self.layers == "high":
            return list(range(final // 2, final, 2)) if final <= 40 else list(range(final - 20, final, 2))
        chosen = [x for x in self.layers if x < final]
        if not chosen:
            raise ValueError(f"dola_layers {list(self.layers)}: no layer below the last ({final})")
        if len(chosen) < len(self.layers):
            warnings.warn(f"dola_layers {[x for x in self.layers if x >= final]} are not below the last layer "
                          f"({final}): left out, as transformers does; candidates {chosen}", stacklevel=2)
        return chosen


def relative_top_filter(final: torch.Tensor, premature: torch.Tensor, relative_top: float = 0.1):
    """transformers' `_relative_top_filter` (min_tokens_to_keep 1): log-softmax of both; tokens whose final
    log-probability is below log(max prob * relative_top) become -inf in the final and -1e-3 in the premature."""
    final, premature = final.log_softmax(dim=-1), premature.log_softmax(dim=-1)
    top = final.max(dim=-1).values
    threshold = torch.min(top, top + np.log(relative_top)).unsqueeze(-1)
    low = final < threshold
    return final.masked_fill(low, -float("inf")), premature.masked_fill(low, -1e-3)


def js_divergence(final: torch.Tensor, premature: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per candidate and row as transformers computes it (KL terms averaged over the
    vocabulary, not summed: the choice is the same). final: [B, V] logits; premature: [C, B, V] -> [C, B]."""
    p_final, p_premature = F.softmax(final, dim=-1), F.softmax(premature, dim=-1)
    mean = 0.5 * (p_final[None] + p_premature)
    kl1 = F.kl_div(F.log_softmax(final, dim=-1)[None], mean, reduction="none").mean(-1)
    kl2 = F.kl_div(F.log_softmax(premature, dim=-1), mean, reduction="none").mean(-1)
    return 0.5 * (kl1 + kl2)


def dola_scores(final: torch.Tensor, premature: torch.Tensor, relative_top: float = 0.1,
                batch_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """final: [B, V] fp32 logits of the last layer; premature: [C, B, V] of the candidates -> ([B, V] DoLa scores,
    [B] int64 the candidate each row was contrasted with): each row's own most divergent candidate, or (batch_rows:
    [B] bool, the rows that count) all rows with the candidate most divergent on average over those rows."""
    if premature.shape[0] == 1:
        best = torch.zeros(final.shape[0], dtype=torch.long, device=final.device)
        chosen = premature[0]
    else:
        js = js_divergence(final, premature)  # [C, B]
        if batch_rows is None:
            best = js.argmax(dim=0)  # [B]
        else:
            weights = batch_rows.to(js.dtype)
            mean = (js * weights).sum(-1) / weights.sum().clamp_min(1)
            best = mean.argmax().expand(final.shape[0])
        chosen = premature.gather(0, best[None, :, None].expand(1, *final.shape))[0]
    final, chosen = relative_top_filter(final, chosen, relative_top)
    return final - chosen, best


class DolaMode(OneStep):
    """A DoLa decode step: every layer runs; the original head and the candidates' logits give the scores. Each
    row's premature layer per token is kept on the device (`buffers`: [B, steps] int64) and reported as
    `GenerationResult.premature_layers`."""

    keeps_logits = True

    def __init__(self, model: MultiExitGPT2, dola: DolaConfig):
        self.model, self.config = model, dola
        self.settings = dola
        self.candidates = dola.candidates(model.config)
        final = model.config.n_layer
        self.stops = sorted({*self.candidates, final})
        self.depth = final
        self.full_heads = 1 + len(self.candidates)  # the final head and every candidate's
        self.layer_ids = torch.tensor(self.candidates, device=model.device)

    def buffers(self, rows: Rows) -> torch.Tensor:
        """[B, steps] int64: the premature layer each row contrasted with at each step."""
        return torch.zeros(rows.io.out.shape, dtype=torch.long, device=rows.io.out.device)

    def premature_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.heads == "exit":
            return self.model.head_logits(hidden, layer)
        return F.linear(hidden, self.model.head_weight("original")).float()  # raw block output, no ln_f

    def step(self, rows: Rows) -> None:
        states = {layer: rows.states(layer) for layer in self.stops}  # in depth order: blocks run once
        final = self.model.head_logits(states[self.depth], "original")
        premature = torch.stack([self.premature_logits(layer, states[layer]) for layer in self.candidates])
        # the rows still running (padding rows are finished from the prefill): a tensor, so a captured step replays it
        batch_rows = ~rows.io.finished if self.config.per_batch else None
        scores, best = dola_scores(final, premature, self.config.relative_top, batch_rows)
        rows.buffers.index_copy_(1, rows.io.step, self.layer_ids[best][:, None])
        if rows.keep_logits:  # before the repetition controls, as a fixed mode keeps its logits
            rows.keep(scores)
        scores = rows.penalize(scores)
        rows.emit(rows.choose(scores.argmax(dim=-1), scores if rows.sampling.do_sample else None))

    def describe(self, rows: Rows, result) -> None:
        layers = rows.buffers[: rows.real_rows].tolist()
        result.premature_layers = [row[: len(t)] for row, t in zip(layers, result.tokens)]
