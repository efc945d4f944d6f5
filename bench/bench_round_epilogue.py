"""A speculative round's epilogue (`kernels/round_epilogue.py`): every row's kept drafts and token written, the
round's cache slots kept or rejected and the next round set up, in one kernel, against its reference (some thirty
small torch operations). pytest-benchmark suite:

    python -m pytest bench/bench_round_epilogue.py --benchmark-only -p no:xdist

It moves little (a few [B] vectors, [B, K + 1] of the output, drafted and valid): its time is launches and latency,
which speculative decoding pays once per round. Bytes count what the reference reads and writes."""

import pytest
import torch

from mexit.kernels.round_epilogue_ref import round_epilogue_ref
from mexit.kernels.step_epilogue_ref import StepIO, stop_ids

K, NEW = 4, 64  # drafts per round; new tokens (output columns NEW + K + 1)


def round_state(rows: int, device, g) -> dict:
    """A round mid-generation: every row made K drafts and kept a random prefix of them."""
    long = dict(dtype=torch.long, device=device)
    columns, slots = NEW + K + 1, 128 + NEW * (K + 1)
    io = StepIO(tokens=torch.zeros(rows, **long), positions=torch.full((rows,), 100, **long),
                finished=torch.zeros(rows, dtype=torch.bool, device=device), eos=stop_ids(50256, device),
                out=torch.zeros(rows, columns, **long), step=torch.zeros(1, **long), slot=torch.tensor([128], **long),
                arrivals=torch.zeros(1, dtype=torch.int32, device=device), wte=torch.zeros(1, 1, device=device),
                wpe=torch.zeros(1, 1, device=device), h0=torch.zeros(rows, 1, device=device))
    return dict(accepted=torch.randint(0, K + 1, (rows,), generator=g, device=device),
                token=torch.randint(0, 50000, (rows,), generator=g, device=device),
                drafts=torch.randint(0, 50000, (rows, K), generator=g, device=device),
                n_drafts=torch.full((rows,), K, **long), draft_i=torch.tensor([K], **long),
                count=torch.full((rows,), 8, **long), drafted=torch.zeros(rows, columns, dtype=torch.bool,
                                                                         device=device),
                io=io, valid=torch.zeros(rows, slots, dtype=torch.bool, device=device))


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_round_epilogue(benchmark, measure, gpu_only, device, impl, rows):
    from mexit.kernels.round_epilogue import round_epilogue

    g = torch.Generator(device=device).manual_seed(rows)
    state = round_state(rows, device, g)
    fn = round_epilogue if impl == "kernel" else round_epilogue_ref

    def call():  # the same round every time: the slot, counts and positions put back first (three small copies,
        # in both timings)
        state["io"].slot.fill_(128)
        state["count"].fill_(8)
        state["io"].finished.zero_()
        fn(**state, max_new_tokens=NEW)

    benchmark.group = f"round epilogue, {rows} rows, {K} drafts"
    nbytes = rows * (8 * 7 + 8 * K + (K + 1) * (8 + 1 + 1))
    measure(call, nbytes, impl=impl, rows=rows)
