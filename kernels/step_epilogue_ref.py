"""Plain PyTorch reference of the decode step's epilogue (no triton import): emit each row's token, then set the
next step up on the device (its input embedding, position, cache slot and step index)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EOS_SLOTS = 8  # stop ids a step state holds (unused slots -1)


def stop_ids(ids, device=None) -> torch.Tensor:
    """The stop ids (None, an id or a sequence of ids) as the [EOS_SLOTS] int64 tensor a StepIO holds."""
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if len(ids) > EOS_SLOTS:
        raise ValueError(f"{len(ids)} stop ids: at most {EOS_SLOTS} are supported")
    return torch.tensor(ids + [-1] * (EOS_SLOTS - len(ids)), dtype=torch.long, device=device)


@dataclass
class StepIO:
    """The device-side state one decode step reads and advances (B rows, T cache slots, d = n_embd).

    tokens, positions [B] int64 (this step's input token and its position); finished [B] bool; eos [EOS_SLOTS]
    int64 (the stop ids, -1 in unused slots; a finished row emits eos[0]); out [B, T] int64 (every step's token);
    step [1] int64 (column of out); slot [1] int64 (cache slot of this step's token); h0 [B, d] (this step's input,
    wte[token] + wpe[position]); wte [V, d], wpe [P, d]; arrivals [1] int32 (zero between kernels: the epilogue
    kernels count their finished programs in it)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    finished: torch.Tensor
    eos: torch.Tensor
    out: torch.Tensor
    step: torch.Tensor
    slot: torch.Tensor
    arrivals: torch.Tensor
    wte: torch.Tensor
    wpe: torch.Tensor
    h0: torch.Tensor

    def pointers(self) -> tuple:
        """The tensors in the order the kernels' epilogue parameters take them."""
        return (self.tokens, self.positions, self.finished, self.eos, self.out, self.step, self.slot, self.arrivals,
                self.wte, self.wpe, self.h0)

    def sizes(self) -> tuple[int, int, int]:
        """(T, d, P): out's row length, the embedding width, the number of positions."""
        return self.out.shape[1], self.h0.shape[1], self.wpe.shape[0]


def step_epilogue_ref(token: torch.Tensor, io: StepIO) -> torch.Tensor:
    """token [B] int64: this step's choice per row. Finished rows emit eos[0] instead; a row emitting any stop id
    finishes.
    Writes out[:, step], tokens, finished; advances positions, step and slot by one; writes the next step's input
    h0 = wte[token] + wpe[position] (token -1, a finished row without eos, reads row 0; positions past the table
    read its last row: such a row's input is never used). Returns finished [B] bool (the updated tensor)."""
    token = torch.where(io.finished, io.eos[0], token)
    io.finished |= (token[:, None] == io.eos[None, :]).any(-1)
    io.out.index_copy_(1, io.step, token[:, None])
    io.tokens.copy_(token)
    io.positions += 1
    io.h0.copy_(io.wte[token.clamp(min=0)] + io.wpe[io.positions.clamp(max=io.wpe.shape[0] - 1)])
    io.step += 1
    io.slot += 1
    return io.finished
