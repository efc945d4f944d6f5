"""Fast decode for the fixed modes (original / exit / ACD): one decode step over static buffers, captured once
per (mode, sampling settings, batch bucket, length bucket) as a CUDA graph and replayed for every token.

Nothing in a step talks to the host: the token, position, cache slot and step index live on the device and the
step advances them itself; sampling reads uniform numbers drawn before the loop; eos handling is a mask. On the
triton backend a greedy step is kernels only: the blocks read the input embedding the previous step's last kernel
wrote, the attention marks the cache slot, and the exit stage's (or ACD's) merge emits the token and advances
the state (`kernels/step_epilogue.py`): 5 launches per block plus 2 (one head) or 4 (ACD). The
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

    def _states(self, h: torch.Tensor, slot) -> list[torch.Tensor]:
        """h_0 [B, S, d] -> E last-position states [B, d] at the layers the heads read."""
        states = self.model.run_to(h, self.layers, self.cache, slot, fused=self.fused, pdl=self.pdl)
        return [states[layer][:, -1] for layer in self.layers]

    def _step_states(self, h: torch.Tensor) -> list[torch.Tensor]:
        return self._states(h, self.slot)

    def _token(self, hidden: list[torch.Tensor], emit=None) -> torch.Tensor | None:
        """The step's token from the heads' states; with `emit` (triton, greedy) the last kernel emits it."""
        greedy, scores = next_token_distribution(self.model, self.key.mode, hidden, self.backend,
                                                 need_scores=self.key.do_sample, emit=emit, pdl=self.pdl)
        return None if emit is not None else self.pick(greedy, scores)

    def step(self) -> None:
        """One decode step, all on the device: the body a CUDA graph captures."""
        if not self.fused:  # the torch attention reads the slot's validity (the attention kernel marks it)
            self.cache.valid.index_fill_(1, self.slot, True)
        hidden = self.run_layers(self.h0[:, None])
        if self.fused and not self.key.do_sample:
            self._token(hidden, emit=self.io)
        else:
            self.emit(self._token(hidden))

    def prefill(self, batch: PaddedBatch, real_rows: int, eos: int | None, uniform: torch.Tensor | None) -> None:
        """Reset for a new batch (rows past `real_rows` are filler), run the prompt eagerly, emit token 0."""
        self.reset(batch, eos, uniform)
        self.emit_first(self._token(self._states(self.model.embed(batch.ids, batch.positions), 0)))
        self.start_decoding(batch, real_rows)

    def capture(self) -> None:
        self.capture_pieces({"step": self.step})

    def advance(self) -> None:
        """One decode step: a graph replay when captured."""
        self.launch("step", self.step)
