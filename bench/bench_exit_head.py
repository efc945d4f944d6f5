"""Benchmark the fused two-exit stage (layernorm + 2 head projections + softmax stats + ACD contrast + greedy
token) against torch eager and torch.compile of the same computation, at gpt2-medium shape, on a CUDA GPU.

    python -m mexit.bench.bench_exit_head --batch 1 8 64 [--dtype fp16] [--sweep] [--out bench_results]

Times are medians of device-side timing (triton.testing.do_bench; `graph` columns replay a CUDA graph, which
removes Python launch overhead). GB/s counts the bytes the stage must move: both heads once (2 x V x d),
hidden rows, and the fp32 logits written and read back. %copy compares with a device-to-device copy measured in
the same run. Every implementation is checked against the float64 reference before it is timed."""

from __future__ import annotations

import argparse
import functools
import sys

import pytest
import torch

from mexit.bench.common import (
    copy_bandwidth_gbs,
    kernel_bench_target,
    kernel_ms,
    markdown_table,
    run_metadata,
    write_results,
)
from mexit.kernels.acd_contrast_ref import acd_contrast_ref

V, D = 50257, 1024  # gpt2-medium head


def make_inputs(batch, dtype, device, seed=0, v=None, d=None):
    v, d = v or V, d or D
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(2, batch, d, device=device, generator=g).to(dtype)
    ln_w = (1 + 0.1 * torch.randn(d, device=device, generator=g)).to(dtype)
    ln_b = (0.1 * torch.randn(d, device=device, generator=g)).to(dtype)
    heads = [(torch.randn(v, d, device=device, generator=g) * 0.05).to(dtype) for _ in range(2)]
    return hidden, ln_w, ln_b, heads


def torch_stage(hidden, ln_w, ln_b, heads, alpha=0.1):
    """The eager computation the fused kernels replace: greedy ACD token from two exits."""
    normed = torch.nn.functional.layer_norm(hidden, (hidden.shape[-1],), ln_w, ln_b, 1e-5)
    upper = torch.nn.functional.linear(normed[0], heads[0]).float()
    lower = torch.nn.functional.linear(normed[1], heads[1]).float()
    return acd_contrast_ref(upper, lower, alpha).argmax(-1)


def fused_stage(hidden, ln_w, ln_b, heads, alpha=0.1, config=None):
    from mexit.kernels.acd_contrast import acd_contrast
    from mexit.kernels.exit_head import exit_head

    out = exit_head(hidden, ln_w, ln_b, 1e-5, heads, config=config)
    return acd_contrast(out.logits, out.lse, alpha)[0]


def stage_bytes(batch, dtype, v=None, d=None):
    v, d = v or V, d or D
    elem = torch.finfo(dtype).bits // 8
    return 2 * v * d * elem + 2 * batch * d * elem + 2 * (2 * batch * v * 4)  # heads, hidden, logits w+r


def check(fn, inputs, batch):
    hidden, ln_w, ln_b, heads = inputs
    want = torch_stage(hidden.double(), ln_w.double(), ln_b.double(), [h.double() for h in heads])
    got = fn(*inputs)
    agree = (got == want).float().mean().item()
    if agree < 0.99:  # fp16 rounding can flip a near-tie; anything more is a bug
        raise AssertionError(f"batch {batch}: only {agree:.1%} of tokens agree with the float64 reference")
    return agree


def sweep_configs(inputs):
    from mexit.kernels.exit_head import tile_config

    base = tile_config(inputs[0].shape[1])
    results = []
    for block_v in (64, 128, 256):
        for block_d in (64, 128, 256):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = dict(base, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
                    try:
                        ms = kernel_ms(lambda c=cfg: fused_stage(*inputs, config=c), inputs[0].device)
                    except Exception as err:  # out of shared memory / registers for this shape
                        print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
                        continue
                    results.append((ms, cfg))
    results.sort(key=lambda r: r[0])
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--sweep", action="store_true", help="also try tile configurations of the fused kernel")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default="bench_results")
    args = p.parse_args(argv)
    target = kernel_bench_target(args.dtype, "bench_exit_head")
    if target is None:
        return 2
    device, dtype = target
    meta = dict(run_metadata(device, dtype), vocab=V, d=D)
    copy_gbs = copy_bandwidth_gbs(device)
    compiled = None if args.no_compile else torch.compile(torch_stage)
    rows = []
    for batch in args.batch:
        inputs = make_inputs(batch, dtype, device)
        nbytes = stage_bytes(batch, dtype)
        impls = {"fused (triton)": fused_stage, "torch eager": torch_stage}
        if compiled is not None:
            impls["torch.compile"] = compiled
        for name, fn in impls.items():
            agree = check(fn, inputs, batch)
            for graph in (False, True) if device.type == "cuda" else (False,):
                ms = kernel_ms(lambda fn=fn: fn(*inputs), device, graph)
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(meta, impl=name, batch=batch, cuda_graph=graph, ms=ms, us=ms * 1e3, gb_s=gbs,
                                 pct_copy=100 * gbs / copy_gbs, floor_us=nbytes / (copy_gbs * 1e9) * 1e6,
                                 copy_gb_s=copy_gbs, token_agreement=agree))
        if args.sweep:
            best = sweep_configs(inputs)[:3]
            for ms, cfg in best:
                print(f"batch {batch}: {ms * 1e3:.1f} us with {cfg}")
    for r in rows:
        eager = next(x for x in rows if x["batch"] == r["batch"] and x["impl"] == "torch eager"
                     and x["cuda_graph"] == r["cuda_graph"])
        r["speedup_vs_eager"] = eager["ms"] / r["ms"]
    path = write_results(rows, args.out, "exit_head")
    print(f"{meta['device']}, {meta['dtype']}, V={V}, d={D}, copy bandwidth {copy_gbs:.0f} GB/s, results in {path}")
    print(markdown_table(rows, ["impl", "batch", "cuda_graph", "us", "gb_s", "pct_copy", "floor_us",
                                "speedup_vs_eager"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- the pytest-benchmark suite (bench/conftest.py: device clock, cold L2, extra_info) ----
@functools.cache
def compiled_stage(exits: int):
    return torch.compile(torch_stage if exits == 2 else one_exit_torch, dynamic=False)


def one_exit_torch(hidden, ln_w, ln_b, heads):
    """The original head's greedy step in torch: layernorm, the head, the argmax."""
    normed = torch.nn.functional.layer_norm(hidden[0], (hidden.shape[-1],), ln_w, ln_b, 1e-5)
    return torch.nn.functional.linear(normed, heads[0]).float().argmax(-1)


def one_exit_fused(hidden, ln_w, ln_b, heads):
    from mexit.kernels.exit_head import exit_head

    return exit_head(hidden[:1], ln_w, ln_b, 1e-5, heads[:1]).argmax[0]


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("impl", ["fused", "torch eager", "torch.compile"])
@pytest.mark.parametrize("exits", [1, 2])
def test_exit_stage(benchmark, measure, gpu_only, device, exits, impl, batch):
    """The exit stage of one head (the greedy original head) or two (the ACD pair with its contrast): layernorm,
    the head projections, the softmax statistics and the token, fused against torch eager and torch.compile."""
    if gpu_only and impl == "torch.compile":
        pytest.skip("torch.compile on the CPU smoke run: minutes of inductor compilation for a call that is not "
                    "timed")
    v, d, dtype = (1000, 64, torch.float32) if gpu_only else (V, D, torch.float16)
    inputs = make_inputs(batch, dtype, device, v=v, d=d)
    nbytes = stage_bytes(batch, dtype, v, d) // (2 if exits == 1 else 1)
    fn = {("fused", 2): fused_stage, ("torch eager", 2): torch_stage, ("fused", 1): one_exit_fused,
          ("torch eager", 1): one_exit_torch}.get((impl, exits)) or compiled_stage(exits)
    benchmark.group = f"exit stage, {exits} exit{'s' if exits > 1 else ''}, batch {batch}"
    measure(lambda: fn(*inputs), nbytes, impl=impl, batch=batch, exits=exits)
