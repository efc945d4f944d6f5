"""State propagation (`kernels/propagate_kv.py`): the keys and values of the blocks an exited row skipped, from its
exit state, against its reference. pytest-benchmark suite:

    python -m pytest bench/bench_propagate_kv.py --benchmark-only -p no:xdist

GB/s counts the c_attn key/value weights of the skipped blocks (2 d x d each) plus the cache rows written."""

import pytest
import torch

from mexit.kernels.propagate_kv_ref import propagate_kv_ref

D, HEADS = 1024, 16  # gpt2-medium


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("skipped", [6, 12])
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_propagate_kv(benchmark, measure, gpu_only, device, impl, skipped, rows):
    from mexit.kernels.propagate_kv import propagate_kv

    d, heads, dtype = (64, 4, torch.float32) if gpu_only else (D, HEADS, torch.float16)
    skipped = min(skipped, 2) if gpu_only else skipped
    layers, slots = skipped + 1, 64
    g = torch.Generator(device=device).manual_seed(rows + skipped)
    weights = dict(ln_w=1 + 0.1 * torch.randn(layers, d, device=device, generator=g),
                   ln_b=0.1 * torch.randn(layers, d, device=device, generator=g),
                   attn_w=torch.randn(layers, 3 * d, d, device=device, generator=g) / d**0.5,
                   attn_b=0.1 * torch.randn(layers, 3 * d, device=device, generator=g))
    weights = {k: w.to(dtype) for k, w in weights.items()}
    cache = [torch.zeros(layers, rows, heads, slots, d // heads, device=device, dtype=dtype) for _ in range(2)]
    h = torch.randn(rows, d, device=device, generator=g).to(dtype)
    which = torch.arange(rows, device=device)
    at = torch.full((rows,), slots - 1, device=device)
    fn = propagate_kv if impl == "kernel" else propagate_kv_ref
    benchmark.group = f"state propagation, {skipped} blocks, {rows} rows"
    elem = torch.finfo(dtype).bits // 8
    measure(lambda: fn(h, *weights.values(), *cache, which, at, 1, layers, 1e-5),
            skipped * (2 * d * d + 2 * d + 2 * d) * elem + 2 * skipped * rows * d * elem, impl=impl, rows=rows,
            skipped=skipped)
