"""Decode attention (`kernels/decode_attention.py`) against its reference at several cache lengths: one new
position per row attending over the slots written so far, gpt2-medium's 16 heads of 64. pytest-benchmark suite:

    python -m pytest bench/bench_decode_attention.py --benchmark-only -p no:xdist

GB/s counts the keys and values read (2 x B x context x d) plus the query and output rows."""

import pytest
import torch

from mexit.kernels.decode_attention_ref import decode_attention_ref

HEADS, HEAD_DIM = 16, 64  # gpt2-medium


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("context", [128, 1024, 4096])
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_decode_attention(benchmark, measure, gpu_only, device, impl, context, batch):
    from mexit.kernels.decode_attention import decode_attention

    heads, hd, dtype = (2, 16, torch.float32) if gpu_only else (HEADS, HEAD_DIM, torch.float16)
    context = min(context, 256) if gpu_only else context
    d = heads * hd
    g = torch.Generator(device=device).manual_seed(context + batch)
    qkv = torch.randn(batch, 3 * d, device=device, generator=g).to(dtype)
    k, v = (torch.randn(batch, heads, context, hd, device=device, generator=g).to(dtype) for _ in range(2))
    valid = torch.ones(batch, context, dtype=torch.bool, device=device)
    slot = torch.tensor([context - 1], device=device)
    fn = decode_attention if impl == "kernel" else decode_attention_ref
    benchmark.group = f"decode attention, context {context}, batch {batch}"
    elem = torch.finfo(dtype).bits // 8
    measure(lambda: fn(qkv, k, v, valid, slot), (2 * batch * context * d + 4 * batch * d) * elem, impl=impl,
            batch=batch, context=context)
