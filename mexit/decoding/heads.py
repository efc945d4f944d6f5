"""A fixed mode's settings (`DecodeConfig`: which heads give each token's distribution) and what its heads give
(`ModeScores`): shared by the fixed modes (`fixed.py`) and speculative decoding, whose target is a fixed mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from mexit.values import plain_fields

if TYPE_CHECKING:
    import torch

    from mexit.model.config import ModelConfig


@dataclass(frozen=True)
class DecodeConfig:
    """What produces the next-token distribution.

    mode: "original" (the tied GPT-2 head after the last layer), "exit" (the head of `exit_layer`),
    or "contrast" (Autocontrastive Decoding of `upper` against `lower`; `upper` may be "original").
    """

    mode: str = "original"
    exit_layer: int | None = None
    upper: int | str | None = None
    lower: int | None = None
    alpha: float = 0.1
    min_candidates: int = 1

    def __post_init__(self):
        plain_fields(self)
        if self.mode not in ("original", "exit", "contrast"):
            raise ValueError(f"unknown mode {self.mode!r}; expected original, exit or contrast")
        if self.mode == "exit" and self.exit_layer is None:
            raise ValueError("mode 'exit' needs exit_layer")
        if self.exit_layer is not None and (type(self.exit_layer) is not int):
            raise ValueError(f"exit_layer must be a layer number (an int), got {self.exit_layer!r}")
        if self.mode == "contrast":
            if self.upper is None or self.lower is None:
                raise ValueError("mode 'contrast' needs both the upper and the lower layer")
            if type(self.lower) is not int:
                raise ValueError(f"contrast lower must be a layer number (an int), got {self.lower!r}")
            if self.upper != "original" and not isinstance(self.upper, int):
                raise ValueError(f"contrast upper must be a layer number or 'original', got {self.upper!r}")
            if self.upper != "original" and self.upper <= self.lower:
                raise ValueError(f"contrast upper layer {self.upper} must be above the lower layer {self.lower}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if int(self.min_candidates) != self.min_candidates or self.min_candidates < 1:
            raise ValueError(f"min_candidates must be an integer >= 1, got {self.min_candidates}")

    def heads(self) -> list[int | str]:
        """The heads this mode reads, in order: [head] or [upper, lower]."""
        if self.mode == "original":
            return ["original"]
        if self.mode == "exit":
            return [self.exit_layer]
        return [self.upper, self.lower]

    def depth(self, config: ModelConfig) -> int:
        """The deepest layer its heads read (the original head reads the last block)."""
        return max(config.n_layer if head == "original" else head for head in self.heads())

    def check(self, config: ModelConfig) -> None:
        """Against a checkpoint: its heads exist, min_candidates fits the vocabulary (ValueError otherwise)."""
        for head in self.heads():
            if head != "original" and head not in config.exit_layers:
                raise ValueError(
                    f"exit layer {head} is not in this checkpoint; its exits are {list(config.exit_layers) or 'none'}"
                )
        if self.mode == "contrast":
            if self.min_candidates > config.vocab_size:
                raise ValueError(f"min_candidates={self.min_candidates} exceeds the vocabulary ({config.vocab_size})")


class ModeScores(NamedTuple):
    """token: the greedy choice [B] int64; scores: [B, V] fp32 to sample from (the head's log-softmax, ACD's log q),
    or None; logits: [B, V] fp32 "logits" of the mode (the head's logits, ACD's log q), or None."""

    token: torch.Tensor
    scores: torch.Tensor | None
    logits: torch.Tensor | None
