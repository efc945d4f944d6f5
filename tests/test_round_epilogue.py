"""The speculative round's epilogue (`ops.round_epilogue`: `kernels/round_epilogue_ref.py`, and on triton the one
kernel `kernels/round_epilogue.py`) on hand-checked rows: kept drafts and the target's token written, cut at a stop
id and at the budget, a finished row untouched, the round's cache slots kept or rejected, the next round's slot,
positions and input; and the kernel bit for bit the reference on random rounds (batches 1/3/7/64, 1..5 drafts,
several stop ids, poisoned outputs)."""

import pytest
import torch
from kernel_utils import DEVICE, poisoned_allocations

from mexit import ops
from mexit.kernels.round_epilogue import round_epilogue
from mexit.kernels.round_epilogue_ref import round_epilogue_ref
from mexit.kernels.step_epilogue_ref import StepIO, stop_ids

BACKENDS = {"torch": ops.TORCH, "triton": ops.Backend("triton")}


@pytest.fixture(params=list(BACKENDS))
def backend(request, monkeypatch):
    """Each backend, the path asserted: on triton the reference must not run."""
    if request.param == "triton":
        monkeypatch.setattr(ops, "round_epilogue_ref", lambda *a, **k: pytest.fail("the reference ran on triton"))
    return BACKENDS[request.param]


def state(finished, count, slot=10, columns=8):
    b = len(finished)
    io = StepIO(tokens=torch.zeros(b, dtype=torch.long), positions=torch.tensor([20, 30, 40][:b]),
                finished=torch.tensor(finished), eos=stop_ids((2,)), out=torch.full((b, columns), -5),
                step=torch.zeros(1, dtype=torch.long), slot=torch.tensor([slot]),
                arrivals=torch.zeros(1, dtype=torch.int32), wte=torch.zeros(4, 3), wpe=torch.zeros(4, 3),
                h0=torch.zeros(b, 3))
    return on_device(io), torch.tensor(count, device=DEVICE)


def on_device(io: StepIO) -> StepIO:
    return StepIO(**{k: v.to(DEVICE) for k, v in vars(io).items()})


def t(values, dtype=torch.long):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def test_rows_keep_accepted_drafts_cut_at_eos_and_budget(backend):
    io, count = state([False, False, False, True], [1, 1, 3, 2])
    io.positions = t([20, 30, 40, 50])
    drafts = t([[5, 6], [2, 9], [5, 6], [7, 7]])
    n_drafts = t([2, 2, 2, 0])
    accepted = t([2, 2, 1, 0])  # row 0 all, row 1 all (its first is eos), row 2 one, row 3 finished
    token = t([7, 8, 3, 1])
    drafted = torch.zeros(4, 8, dtype=torch.bool, device=DEVICE)
    valid = torch.zeros(4, 16, dtype=torch.bool, device=DEVICE)
    was = ops.round_epilogue(accepted, token, drafts, n_drafts, t([2]), count, drafted, io, valid,
                             max_new_tokens=4, backend=backend)
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


def test_a_round_cut_short_advances_by_the_drafts_fed(backend):
    io, count = state([False, False], [1, 1])
    io.positions = t([20, 30])
    drafts = t([[5, 0], [6, 0]])
    valid = torch.zeros(2, 16, dtype=torch.bool, device=DEVICE)
    ops.round_epilogue(t([0, 1]), t([4, 4]), drafts, t([1, 1]), t([2]), count,
                       torch.zeros(2, 8, dtype=torch.bool, device=DEVICE), io, valid, max_new_tokens=8,
                       backend=backend)
    assert io.slot.item() == 12  # two positions fed, the second draft proposed by no row: 2 slots
    assert valid[:, 10:13].tolist() == [[True, False, False], [True, True, False]]


def random_round(b: int, k: int, seed: int):
    """A round as the speculative mode leaves it before its epilogue: drafts made per row up to the positions fed,
    accepted a prefix of them, counts inside the budget for unfinished rows; outputs and masks hold noise."""
    g = torch.Generator().manual_seed(seed)
    max_new, vocab = 12, 6  # a small vocabulary: stop ids come up among drafts and tokens
    fed = int(torch.randint(1, k + 1, (1,), generator=g))
    n_drafts = torch.randint(0, fed + 1, (b,), generator=g)
    accepted = (torch.rand(b, generator=g) * (n_drafts + 1)).long().clamp(max=n_drafts)
    finished = torch.rand(b, generator=g) < 0.25
    count = torch.randint(1, max_new, (b,), generator=g)
    columns, slots = max_new + k + 1, 40
    io = StepIO(tokens=torch.randint(vocab, (b,), generator=g), positions=torch.randint(50, (b,), generator=g),
                finished=finished, eos=stop_ids((4, 1)), out=torch.randint(-9, vocab, (b, columns), generator=g),
                step=torch.zeros(1, dtype=torch.long), slot=torch.randint(0, slots - k - 1, (1,), generator=g),
                arrivals=torch.zeros(1, dtype=torch.int32), wte=torch.zeros(4, 3), wpe=torch.zeros(4, 3),
                h0=torch.zeros(b, 3))
    args = dict(accepted=accepted, token=torch.randint(vocab, (b,), generator=g),
                drafts=torch.randint(vocab, (b, k), generator=g), n_drafts=n_drafts, draft_i=torch.tensor([fed]),
                count=count, drafted=torch.rand(b, columns, generator=g) < 0.5, io=io,
                valid=torch.rand(b, slots, generator=g) < 0.5)
    return {name: (on_device(v) if isinstance(v, StepIO) else v.to(DEVICE)) for name, v in args.items()}, max_new


def copy(args: dict) -> dict:
    return {name: (StepIO(**{k: x.clone() for k, x in vars(v).items()}) if isinstance(v, StepIO) else v.clone())
            for name, v in args.items()}


@pytest.mark.parametrize("b", [1, 3, 7, 64])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_kernel_equals_reference_bit_for_bit(b, k, monkeypatch):
    for seed in range(3):
        ours, max_new = random_round(b, k, seed=100 * b + 10 * k + seed)
        ref = copy(ours)
        with poisoned_allocations(monkeypatch):
            was = round_epilogue(**ours, max_new_tokens=max_new)
        want = round_epilogue_ref(**ref, max_new_tokens=max_new)
        assert torch.equal(was, want)
        for name, value in ours.items():
            pairs = vars(value).items() if isinstance(value, StepIO) else [(name, value)]
            for field, tensor in pairs:
                other = getattr(ref["io"], field) if isinstance(value, StepIO) else ref[name]
                assert torch.equal(tensor, other), (seed, field)


def test_kernel_refuses_other_dtypes():
    args, max_new = random_round(3, 2, seed=0)
    args["valid"] = args["valid"].int()
    with pytest.raises(ValueError, match="int64 indices and tokens and bool masks"):
        round_epilogue(**args, max_new_tokens=max_new)
