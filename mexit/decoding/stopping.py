"""Stop rules beside stop ids: a host-side rule (stop strings, transformers' stopping criteria) read as the tokens
stream, ending rows where it fires."""

from __future__ import annotations

import torch

from mexit.values import plain


class StopWatch:
    """A stop rule applied as the tokens stream: `rule(tokens)` gets every row's output tokens so far (all rows the
    same length: a row past its stop id reads that id) after each position and returns, per row, whether the row
    ends there (a list of bools). A row ends at its first True; generation stops once every row has ended or
    produced a stop id."""

    def __init__(self, rule, rows: int, eos: tuple[int, ...] | None, on_token=None):
        self.rule, self.eos, self.on_token = rule, eos or (), on_token
        self.seen: list[list[int]] = [[] for _ in range(rows)]
        self.ended: list[int | None] = [None] * rows
        self.at_eos = [False] * rows

    def __call__(self, tokens: torch.Tensor) -> None:
        """on_token: one position of every row."""
        if self.on_token is not None:
            self.on_token(tokens)
        self.add(tokens.tolist())

    def add(self, column: list[int]) -> None:
        for b, t in enumerate(column):
            self.seen[b].append(t)
            self.at_eos[b] |= t in self.eos
        n = len(self.seen[0])
        for b, done in enumerate(row_verdicts(self.rule(self.seen), len(self.seen))):
            if done and self.ended[b] is None:
                self.ended[b] = n

    def all_ended(self) -> bool:
        return all(e is not None or f for e, f in zip(self.ended, self.at_eos))

    def cut(self, table: list[list[int]]) -> list[list[int]]:
        """The rule over the positions the stream did not reach (speculative rounds run ahead of the slowest row),
        then each row cut where it ended."""
        fill = self.eos[0] if self.eos else 0
        for t in range(len(self.seen[0]), max(map(len, table))):
            self.add([row[t] if t < len(row) else fill for row in table])
        return [row if e is None else row[:e] for row, e in zip(table, self.ended)]


def row_verdicts(answer, rows: int) -> list[bool]:
    """A stop rule's answer as one bool per row: a list, tuple, generator, numpy array or tensor of `rows` truth
    values; anything else is a ValueError naming what came back."""
    shown = answer = plain(answer)  # numpy / torch: lists
    if not isinstance(answer, (list, tuple, str, bytes)) and hasattr(answer, "__iter__"):  # a generator
        answer = shown = list(answer)
    if not isinstance(answer, (list, tuple)) or len(answer) != rows or any(isinstance(x, (list, tuple))
                                                                          for x in answer):
        raise ValueError(f"a stop rule returns one bool per row ({rows} here), got {shown!r}")
    return [bool(x) for x in answer]
