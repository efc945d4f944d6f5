"""The speculative round's epilogue (`kernels/round_epilogue_ref.py`, `ops.round_epilogue`) on hand-checked rows:
kept drafts and the target's token written, cut at a stop id and at the budget, a finished row untouched, the
round's cache slots kept or rejected, the next round's slot, positions and input."""

import torch

from mexit import ops
from mexit.kernels.step_epilogue_ref import StepIO, stop_ids


def state(finished, count, slot=10, columns=8):
    b = len(finished)
    return StepIO(tokens=torch.zeros(b, dtype=torch.long), positions=torch.tensor([20, 30, 40][:b]),
                  finished=torch.tensor(finished), eos=stop_ids((2,)), out=torch.full((b, columns), -5),
                  step=torch.zeros(1, dtype=torch.long), slot=torch.tensor([slot]),
                  arrivals=torch.zeros(1, dtype=torch.int32), wte=torch.zeros(4, 3), wpe=torch.zeros(4, 3),
                  h0=torch.zeros(b, 3)), torch.tensor(count)


def test_rows_keep_accepted_drafts_cut_at_eos_and_budget():
    io, count = state([False, False, False, True], [1, 1, 3, 2])
    io.positions = torch.tensor([20, 30, 40, 50])
    drafts = torch.tensor([[5, 6], [2, 9], [5, 6], [7, 7]])
    n_drafts = torch.tensor([2, 2, 2, 0])
    accepted = torch.tensor([2, 2, 1, 0])  # row 0 all, row 1 all (its first is eos), row 2 one, row 3 finished
    token = torch.tensor([7, 8, 3, 1])
    drafted = torch.zeros(4, 8, dtype=torch.bool)
    valid = torch.zeros(4, 16, dtype=torch.bool)
    was = ops.round_epilogue(accepted, token, drafts, n_drafts, torch.tensor([2]), count, drafted, io, valid,
                             max_new_tokens=4)
    assert was.tolist() == [False, False, False, True]
    assert io.out[0, 1:4].tolist() == [5, 6, 7] and io.out[0, 4:].eq(-5).all()  # 3 new tokens at columns 1..3
    assert io.out[1, 1].item() == 2 and io.out[1, 2:].eq(-5).all()  # cut after the stop id
    assert io.out[2, 3].item() == 5 and io.out[2, 4:].eq(-5).all()  # the budget of 4 tokens keeps one
    assert io.out[3].eq(-5).all()  # finished before the round: nothing written
    assert count.tolist() == [4, 2, 4, 2]
    assert io.finished.tolist() == [True, True, True, True]  # budget, eos, budget, already
    assert drafted[0, 1:4].tolist() == [True, True, False] and drafted[2, 3].item()
    # slots 10..12: valid up to each unfinished row's accepted drafts (its token's own slot included)
    assert valid[:, 10:13].tolist() == [[True] * 3, [True] * 3, [True, True, False], [False] * 3]
    assert not valid[:, :10].any() and not valid[:, 13:].any()
    assert io.slot.item() == 13  # every fed draft was proposed by some row: the round is 3 slots wide
    assert io.positions.tolist() == [23, 33, 42, 51] and io.tokens.tolist() == token.tolist()


def test_a_round_cut_short_advances_by_the_drafts_fed():
    io, count = state([False, False], [1, 1])
    io.positions = torch.tensor([20, 30])
    drafts = torch.tensor([[5, 0], [6, 0]])
    valid = torch.zeros(2, 16, dtype=torch.bool)
    ops.round_epilogue(torch.tensor([0, 1]), torch.tensor([4, 4]), drafts, torch.tensor([1, 1]), torch.tensor([2]),
                       count, torch.zeros(2, 8, dtype=torch.bool), io, valid, max_new_tokens=8)
    assert io.slot.item() == 12  # two positions fed, the second draft proposed by no row: 2 slots
    assert valid[:, 10:13].tolist() == [[True, False, False], [True, True, False]]
