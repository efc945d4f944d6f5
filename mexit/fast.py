"""Fast decode for the fixed modes (original / exit / ACD): one decode step over static buffers, captured once
per (mode, sampling settings, batch bucket, length bucket) as a CUDA graph and replayed for every token.

Nothing in a step talks to the host: the token, position, cache slot and step index live on the device and the
step advances them itself; sampling reads uniform numbers drawn before the loop; eos handling is a mask. The
host only replays the graph and, every `EOS_CHECK_EVERY` steps (`mexit/static_engine.py`), reads one flag to
stop early when every row has finished. The prefill runs eagerly (fused attention through
scaled_dot_product_attention) into the same static cache. Without CUDA the same step runs eagerly ("static"
engine): that is how CPU tests check it.
"""

from __future__ import annotations

import torch

from .generation import PaddedBatch, layer_of
from .heads import next_token_distribution
from .model import MultiExitGPT2
from .static_state import StaticBuffers, StepKey, compiled


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
