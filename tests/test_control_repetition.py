"""The repetition-controls kernel equals its PyTorch reference bit for bit (interpreter on CPU, or a GPU): odd
vocabularies, 1 to 64 rows, speculative rounds of J rows per sequence, sequences with repeats, -inf and NaN scores,
n-grams longer than the sequences; one launch."""

import pytest
import torch
from kernel_utils import DEVICE, poisoned_allocations

from mexit.kernels.control_repetition import control_repetition
from mexit.kernels.control_repetition_ref import control_repetition_ref
from mexit.ops.launches import count_launches


@pytest.mark.parametrize("rows,j,v,length", [(1, 1, 50257, 40), (3, 1, 257, 9), (7, 1, 257, 33), (64, 1, 11, 12),
                                             (6, 3, 257, 20)])
@pytest.mark.parametrize("penalty,ngram", [(1.3, 0), (0.7, 0), (1.0, 1), (1.0, 2), (1.2, 3), (1.5, 50)])
def test_equals_reference(rows, j, v, length, penalty, ngram, monkeypatch):
    g = torch.Generator().manual_seed(rows * v + length)
    history = torch.randint(0, min(v, 9), (rows // j, length), generator=g)  # few distinct tokens: repeats
    last = torch.randint(0, length, (rows,), generator=g)
    scores = torch.randn(rows, v, generator=g) * 4
    scores[0, :3] = torch.tensor([float("-inf"), float("nan"), 0.0])
    shape = (rows // j, j, v) if j > 1 else (rows, v)
    want = control_repetition_ref(scores.view(shape), history, last.view(shape[:-1]), penalty, ngram)
    with count_launches() as launched, poisoned_allocations(monkeypatch):  # an unwritten element would be NaN
        got = control_repetition(scores.view(shape).to(DEVICE), history.to(DEVICE), last.view(shape[:-1]).to(DEVICE),
                                 penalty, ngram)
    assert launched["triton:_control_repetition"] == 1
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
    if penalty != 1.0:  # the penalty acts on every row's seen tokens
        assert not torch.equal(torch.nan_to_num(want), torch.nan_to_num(scores.view(shape)))


def test_no_controls_return_the_scores_and_bad_shapes_are_refused():
    scores = torch.randn(2, 5, device=DEVICE)
    history = torch.zeros(2, 4, dtype=torch.long, device=DEVICE)
    last = torch.zeros(2, dtype=torch.long, device=DEVICE)
    assert control_repetition(scores, history, last, 1.0, 0) is scores
    with pytest.raises(ValueError, match="do not fit together"):
        control_repetition(torch.randn(3, 5, device=DEVICE), history, torch.zeros(3, dtype=torch.long), 1.2, 0)
    history = torch.tensor([[1, 2, 3, 1, 2, 0]], device=DEVICE)  # ... 1 2 3 1 2: (2, 3) would repeat
    got = control_repetition(torch.zeros(1, 5, device=DEVICE), history, torch.tensor([4], device=DEVICE), 1.0, 2)
    assert got.cpu().tolist() == [[0.0, 0.0, 0.0, float("-inf"), 0.0]]
    got = control_repetition(torch.ones(1, 5, device=DEVICE), history, torch.tensor([4], device=DEVICE), 2.0, 3)
    assert got.cpu().tolist() == [[1.0, 0.5, 0.5, float("-inf"), 1.0]]  # (1, 2, 3) would repeat; 1, 2, 3 seen

