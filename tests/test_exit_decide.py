"""The exit-decision kernel equals its PyTorch reference bit for bit (interpreter on CPU, or a GPU)."""

import pytest
import torch
from kernel_utils import DEVICE

from mexit.kernels.exit_decide import exit_decide
from mexit.kernels.exit_decide_ref import exit_decide_ref
from mexit.ops.launches import count_launches


def make_state(B, D, T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    state = dict(
        confidence=torch.rand(B, 2, generator=g)[:, 0],  # strided views, as a [B, 2] top-2's first column
        thresholds=torch.rand(T, generator=g),
        step=torch.tensor([int(torch.randint(T, (1,), generator=g))]),
        running=torch.rand(B, generator=g) < 0.7,
        fired=torch.rand(B, generator=g) < 0.5,
        candidate=torch.randint(1000, (B, 2), generator=g)[:, 1],
        chosen=torch.randint(1000, (B,), generator=g),
        h_last=torch.randn(B, 2, D, generator=g).to(dtype)[:, 1],  # a strided view, as h[:, -1]
        h_exit=torch.randn(B, D, generator=g).to(dtype),
        exit_at=torch.randint(24, (B, T), generator=g),
        conf_at=torch.rand(B, T, generator=g),
        flags=torch.zeros(2, dtype=torch.bool),
        skip=torch.full((1,), 5, dtype=torch.int32),
        fired_none=torch.full((1,), 5, dtype=torch.int32),
    )
    state["confidence"][0] = state["thresholds"][state["step"]]  # a tie: confidence == threshold exits
    return {k: v.to(DEVICE) for k, v in state.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,D", [(1, 64), (3, 48), (7, 1024), (64, 96)])
@pytest.mark.parametrize("with_candidate,predicated", [(True, False), (False, True)])
def test_equals_reference(B, D, dtype, with_candidate, predicated):
    ours = make_state(B, D, 20, dtype, seed=B * D)
    ref = {k: v.clone() for k, v in ours.items()}
    for state, fn in ((ours, exit_decide), (ref, exit_decide_ref)):
        kw = dict(skip=state["skip"], fired_none=state["fired_none"]) if predicated else {}
        fn(7, state["confidence"], state["thresholds"], state["step"], state["running"], state["fired"],
           state["candidate"] if with_candidate else None, state["chosen"], state["h_last"], state["h_exit"],
           state["exit_at"], state["conf_at"], state["flags"], **kw)
    for name in ours:
        assert torch.equal(ours[name], ref[name]), name
    assert ref["fired"][0] == ref["fired"].new_tensor(bool(make_state(B, D, 20, dtype, B * D)["running"][0]))


def test_counts_launches_and_rejects_bad_buffers():
    state = make_state(3, 32, 8, torch.float32, 0)
    args = [state[k] for k in ("confidence", "thresholds", "step", "running", "fired", "candidate", "chosen",
                               "h_last", "h_exit", "exit_at", "conf_at", "flags")]
    with count_launches() as launched:
        exit_decide(2, *args)
    assert launched["triton:_exit_decide"] == 1
    args[10] = state["conf_at"].double()
    with pytest.raises(ValueError, match="float32"):
        exit_decide(2, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,D", [(1, 64), (3, 48), (7, 1024), (64, 96)])
def test_learned_predictor_in_the_decision_equals_reference(B, D, dtype):
    """The probe's confidence is computed in the kernel (fp32, two passes): close to the reference's, the same
    decisions (thresholds are drawn away from the confidences' rounding), written into `confidence`."""
    from mexit.kernels.exit_decide_ref import probe_confidence

    ours = make_state(B, D, 20, dtype, seed=B + D)
    g = torch.Generator().manual_seed(D)
    ours["h_last"] = (torch.randn(B, D, generator=g) * 3 + 5).to(dtype).to(DEVICE)  # offset: the mean matters
    ours["confidence"] = torch.zeros(B, device=DEVICE)
    weight = (torch.randn(D, generator=g) / D ** 0.5).to(DEVICE)
    bias = torch.tensor([0.2], device=DEVICE)
    expected = probe_confidence(ours["h_last"], weight, bias, 1e-5)
    step = int(ours["step"])
    ours["thresholds"][step] = 0.5 if (expected - 0.5).abs().min() > 1e-4 else 0.37
    ref = {k: v.clone() for k, v in ours.items()}
    for state, fn in ((ours, exit_decide), (ref, exit_decide_ref)):
        fn(7, state["confidence"], state["thresholds"], state["step"], state["running"], state["fired"], None,
           state["chosen"], state["h_last"], state["h_exit"], state["exit_at"], state["conf_at"], state["flags"],
           probe=(weight, bias, 1e-5))
    torch.testing.assert_close(ours["confidence"], expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(ours["conf_at"], ref["conf_at"], atol=2e-6, rtol=0)
    for name in ("running", "fired", "chosen", "exit_at", "h_exit", "flags"):
        assert torch.equal(ours[name], ref[name]), name
    assert ours["fired"].any() or not ours["running"].any() or (expected < ours["thresholds"][step]).all()
