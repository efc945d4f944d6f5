"""The exit decision at a checked exit (`kernels/exit_decide.py`): threshold, chosen token, exit state and records
for every row in one kernel, with a head's confidence or the learned predictor computed in the kernel, against its
reference (a handful of torch operations). pytest-benchmark suite:

    python -m pytest bench/bench_exit_decide.py --benchmark-only -p no:xdist

A decision moves little (the rows' exit states, [B, d], and a few [B] vectors): its time is launches and latency,
which is what early exit pays per checked exit. Bytes count h_last read (with the predictor) and h_exit written."""

import pytest
import torch

from mexit.kernels.exit_decide_ref import exit_decide_ref

D, STEPS = 1024, 64  # gpt2-medium's width; thresholds and records per step


def decision_state(rows: int, d: int, dtype, device, g) -> dict:
    """The tensors a decision reads and updates, half the rows running, confidences around the threshold."""
    return dict(confidence=torch.rand(rows, device=device, generator=g), thresholds=torch.full((STEPS,), 0.5,
                                                                                              device=device),
                step=torch.tensor([3], device=device), running=torch.arange(rows, device=device) % 2 == 0,
                fired=torch.zeros(rows, dtype=torch.bool, device=device),
                candidate=torch.randint(0, 50257, (rows,), device=device, generator=g),
                chosen=torch.zeros(rows, dtype=torch.long, device=device),
                h_last=torch.randn(rows, d, device=device, generator=g).to(dtype),
                h_exit=torch.zeros(rows, d, device=device, dtype=dtype),
                exit_at=torch.zeros(rows, STEPS, dtype=torch.long, device=device),
                conf_at=torch.zeros(rows, STEPS, device=device), flags=torch.zeros(2, dtype=torch.bool, device=device))


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("measure_kind", ["head", "learned"])
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_exit_decide(benchmark, measure, gpu_only, device, impl, measure_kind, rows):
    from mexit.kernels.exit_decide import exit_decide

    d, dtype = (64, torch.float32) if gpu_only else (D, torch.float16)
    g = torch.Generator(device=device).manual_seed(rows)
    state = decision_state(rows, d, dtype, device, g)
    probe = None
    if measure_kind == "learned":
        probe = (torch.randn(d, device=device, generator=g) / d**0.5, torch.zeros(1, device=device), 1e-5)
        state["candidate"] = None  # the head runs later, for the rows that fire
    fn = exit_decide if impl == "kernel" else exit_decide_ref
    benchmark.group = f"exit decision, {measure_kind}, {rows} rows"
    elem = torch.finfo(dtype).bits // 8
    nbytes = rows * d * elem * (2 if probe else 1) + rows * (8 + 4 + 8 + 8)
    measure(lambda: fn(2, *state.values(), probe=probe), nbytes, impl=impl, rows=rows, measure=measure_kind)
