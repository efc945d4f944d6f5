"""The decode step's epilogue, alone and folded into the kernels that pick the token (exit-head merge, ACD merge,
the final early-exit decision), equals `step_epilogue_ref` bit for bit: tokens, eos masking, the output column,
the next input embedding, positions, step, slot, and the arrival counter left at zero."""

import pytest
import torch
from kernel_utils import DEVICE

from mexit.kernels.acd_contrast import acd_contrast
from mexit.kernels.exit_decide import exit_decide
from mexit.kernels.exit_decide_ref import exit_decide_ref
from mexit.kernels.exit_head import exit_head
from mexit.kernels.exit_head_ref import exit_head_ref
from mexit.kernels.step_epilogue import step_epilogue
from mexit.kernels.step_epilogue_ref import StepIO, step_epilogue_ref, stop_ids
from mexit.ops.launches import count_launches


def make_io(B, d, T, V, P, dtype, seed, eos=5) -> StepIO:
    """Random state: some rows finished, positions up to the table's end, step and slot inside T."""
    g = torch.Generator().manual_seed(seed)
    io = StepIO(tokens=torch.randint(V, (B,), generator=g), positions=torch.randint(P, (B,), generator=g),
                finished=torch.rand(B, generator=g) < 0.3, eos=stop_ids(None if eos == -1 else eos),
                out=torch.randint(V, (B, T), generator=g),
                step=torch.tensor([int(torch.randint(T, (1,), generator=g))]), slot=torch.tensor([7]),
                arrivals=torch.zeros(1, dtype=torch.int32), wte=torch.randn(V, d, generator=g).to(dtype),
                wpe=torch.randn(P, d, generator=g).to(dtype), h0=torch.full((B, d), float("nan")).to(dtype))
    io.positions[0] = P - 1  # the next position would run past the table
    return StepIO(**{k: v.to(DEVICE) for k, v in vars(io).items()})


def clone(io: StepIO) -> StepIO:
    return StepIO(**{k: v.clone() for k, v in vars(io).items()})


def assert_same(a: StepIO, b: StepIO):
    for name in vars(a):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.arrivals.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,eos", [(1, 5), (3, -1), (7, 5), (64, 5), (7, (9, 5, 11))])
def test_standalone_kernel_equals_reference(B, eos, dtype):
    ours = make_io(B, 48, 20, 50, 30, dtype, seed=B, eos=eos)
    ref = clone(ours)
    token = torch.randint(50, (B,), device=DEVICE)
    token[B // 2] = 5  # a row emitting a stop id finishes
    if B > 3:
        token[B - 1] = 11 if isinstance(eos, tuple) else 12
    with count_launches() as launched:
        step_epilogue(token, ours)
    assert launched["triton:_step_epilogue"] == 1
    step_epilogue_ref(token, ref)
    assert_same(ours, ref)
    assert not torch.isnan(ours.h0).any()
    ours_step = int(ours.step)
    step_epilogue(token, ours)  # a second step writes the next column
    assert int(ours.step) == ours_step + 1 and int(ours.slot) == 9


@pytest.mark.parametrize("B", [1, 3, 17])
def test_exit_head_merge_emits_its_argmax(B):
    g = torch.Generator().manual_seed(B)
    d, V = 32, 257
    hidden = torch.randn(B, d, generator=g).to(DEVICE)
    head = torch.randn(V, d, generator=g).to(DEVICE)
    ln = (torch.ones(d, device=DEVICE), torch.zeros(d, device=DEVICE))
    ours = make_io(B, d, 16, V, 30, torch.float32, seed=B)
    ref = clone(ours)
    out = exit_head([hidden], *ln, 1e-5, [head], emit=ours)
    step_epilogue_ref(exit_head_ref([hidden], *ln, 1e-5, [head]).argmax[0], ref)
    assert_same(ours, ref)
    assert torch.equal(out.argmax[0], exit_head_ref([hidden], *ln, 1e-5, [head]).argmax[0])


@pytest.mark.parametrize("B", [1, 7])
def test_acd_merge_emits_its_token(B):
    g = torch.Generator().manual_seed(B)
    z = (torch.randn(2, B, 301, generator=g) * 3).to(DEVICE)
    lse = torch.logsumexp(z, -1)
    ours = make_io(B, 16, 16, 301, 30, torch.float32, seed=B)
    ref = clone(ours)
    token, _ = acd_contrast(z, lse, 0.1, 1, max_logit=z.max(-1).values, emit=ours, block_v=128)
    step_epilogue_ref(acd_contrast(z, lse, 0.1, 1)[0], ref)
    assert_same(ours, ref)


@pytest.mark.parametrize("B", [1, 5, 64])
@pytest.mark.parametrize("with_candidate", [True, False])
def test_final_decision_emits_and_sets_the_next_step_up(B, with_candidate):
    """The last layer's decision: running rows take the final head's token and record the depth; then the token
    is emitted, running = not finished, h_exit = the next input, skip = no row running."""
    g = torch.Generator().manual_seed(B)
    d, T = 24, 12
    io = make_io(B, d, T, 100, 30, torch.float16, seed=B)
    state = dict(confidence=torch.rand(B, generator=g), thresholds=torch.rand(T, generator=g),
                 running=torch.arange(B) % 2 == 0, fired=torch.zeros(B, dtype=torch.bool),
                 candidate=torch.arange(B) + 3, chosen=torch.arange(B) + 20,
                 h_exit=torch.randn(B, d, generator=g).half(),
                 exit_at=torch.zeros(B, T, dtype=torch.long), conf_at=torch.zeros(B, T),
                 flags=torch.zeros(2, dtype=torch.bool), skip=torch.zeros(1, dtype=torch.int32))
    state = {k: v.to(DEVICE) for k, v in state.items()}
    states = [(io, state), (clone(io), {k: v.clone() for k, v in state.items()})]
    for (io, s), fn in zip(states, (exit_decide, exit_decide_ref)):
        fn(24, s["confidence"], s["thresholds"], io.step, s["running"], s["fired"],
           s["candidate"] if with_candidate else None, s["chosen"], None, s["h_exit"], s["exit_at"], s["conf_at"],
           s["flags"], skip=s["skip"], final=True, emit=io)
    (io, ours), (io_ref, ref) = states
    assert_same(io, io_ref)
    for name in ours:
        assert torch.equal(ours[name], ref[name]), name
    assert torch.equal(ours["h_exit"], io.h0) and torch.equal(ours["running"], ~io.finished)
