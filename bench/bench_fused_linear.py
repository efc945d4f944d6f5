"""Benchmark one GPT-2 decode block at gpt2-medium width on a CUDA GPU: the fused path (four fused-linear Triton
kernels around the decode-attention kernel) against the torch path (layernorms, cuBLAS matmuls, gelu and residual
adds as separate kernels, attention over the whole cache bucket), torch matmuls with the attention kernel (what
batches above `fused_max_rows` run), the predicated block (skip flag set: what a block past the exit costs inside
one graph), and each of the four matmuls alone.

    python -m mexit.bench.bench_fused_linear --batch 1 8 16 64 [--dtype fp16] [--context 160] [--sweep]

Times are medians of triton.testing.do_bench_cudagraph (graph replay, as decoding runs). GB/s counts the bytes
the call must read: the weights it uses (a skipped block: c_attn's key/value columns) plus, for a block, the
keys/values of `context` cached positions. %copy compares with a device-to-device copy measured in the same run.
Every path is checked against a float64 run of the same block before it is timed."""

from __future__ import annotations

import argparse
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
from mexit.kernels.fused_linear_ref import fused_linear_ref
from mexit.model.checkpoint import random_model
from mexit.model.config import ModelConfig
from mexit.ops import TORCH, Backend

D, HEADS = 1024, 16  # gpt2-medium


def block_setup(batch: int, context: int, dtype, device, d: int | None = None, heads: int | None = None):
    """A one-block model of gpt2-medium width (or d, heads), a static cache with `context` valid slots, one input row
    each."""
    d, heads = d or D, heads or HEADS
    config = ModelConfig(n_layer=1, n_embd=d, n_head=heads, vocab_size=8, n_positions=1024)
    model = random_model(config, seed=1, dtype=dtype, device=device)
    length = -(-context // 128) * 128
    cache = model.new_cache(batch, length)
    cache.k.normal_()
    cache.v.normal_()
    cache.start(torch.ones(batch, context, dtype=torch.bool, device=device))
    slot = torch.tensor([context - 1], device=device)
    x = torch.randn(batch, 1, d, device=device, dtype=model.dtype)
    return model, cache, slot, x


def block_bytes(batch: int, context: int, elem: int, skipped: bool, d: int | None = None) -> int:
    """Bytes a block must move: its weights and the cached keys / values it attends over; a skipped block reads
    c_attn's key/value columns and writes the new keys / values, and attends over nothing."""
    d = d or D
    if skipped:
        return (2 * d * d + 2 * d) * elem + 2 * batch * d * elem
    return (12 * d * d + 13 * d + 4 * d) * elem + 2 * batch * context * d * elem  # matrices, biases, layernorms


def check_block(model, cache, slot, x, outputs: dict) -> None:
    """Each path's block output against the same block in float64 (the cache is rewritten identically)."""
    exact = model.__class__(model.config, model.w.to(dtype=torch.float64))
    cache64 = exact.new_cache(x.shape[0], cache.k.shape[3])
    cache64.k.copy_(cache.k)
    cache64.v.copy_(cache.v)
    cache64.start(cache.valid)
    want = exact.run_layers(x.double(), 0, 1, cache64, slot)
    for name, got in outputs.items():
        err = ((got.double() - want).norm() / want.norm()).item()
        if err > 2e-2:
            raise AssertionError(f"{name}: relative error {err:.2e} against float64")


def matmuls(d: int) -> dict:
    """name: (K, N, options) of a block's four fused-linear calls at width d."""
    return {
        "c_attn (ln_1)": (d, 3 * d, dict(ln=True)),
        "attn c_proj (+res)": (d, d, dict(residual=True)),
        "c_fc (ln_2, gelu)": (d, 4 * d, dict(ln=True, gelu=True)),
        "mlp c_proj (+res)": (4 * d, d, dict(residual=True)),
    }


def matmul_inputs(batch, K, N, options, dtype, device):
    g = torch.Generator(device=device).manual_seed(K + N)
    x = torch.randn(batch, K, device=device, generator=g).to(dtype)
    w = (torch.randn(N, K, device=device, generator=g) / K**0.5).to(dtype)
    b = (0.1 * torch.randn(N, device=device, generator=g)).to(dtype)
    kw = dict(gelu=options.get("gelu", False))
    if options.get("ln"):
        kw["ln"] = (torch.ones(K, device=device, dtype=dtype), torch.zeros(K, device=device, dtype=dtype), 1e-5)
    if options.get("residual"):
        kw["residual"] = torch.randn(batch, N, device=device, generator=g).to(dtype)
    return x, w, b, kw


def sweep(batch, K, N, options, dtype, device):
    """Tile configurations of fused_linear for one matmul, fastest first."""
    from mexit.kernels.fused_linear import fused_linear, tile_config

    x, w, b, kw = matmul_inputs(batch, K, N, options, dtype, device)
    base = tile_config(batch, N)
    results = []
    for block_n in (16, 32, 64, 128):
        for block_k in (64, 128, 256):
            for warps in (2, 4, 8):
                for stages in (2, 3, 4, 5):
                    cfg = dict(base, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
                    try:
                        results.append((kernel_ms(lambda c=cfg: fused_linear(x, w, b, config=c, **kw), device), cfg))
                    except Exception as err:  # out of shared memory / registers for this shape
                        print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
    return sorted(results, key=lambda r: r[0])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 64])
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--context", type=int, default=160, help="cached positions the attention reads")
    p.add_argument("--sweep", action="store_true", help="also try tile configurations of each matmul")
    p.add_argument("--out", default="bench_results")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    target = kernel_bench_target(args.dtype, "bench_fused_linear")
    if target is None:
        return 2
    device, dtype = target
    from mexit.kernels.fused_linear import fused_linear

    elem = torch.finfo(dtype).bits // 8
    meta = dict(run_metadata(device, dtype), d=D, context=args.context)
    copy_gbs = copy_bandwidth_gbs(device)
    rows = []

    def record(what, impl, batch, ms, nbytes):
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(meta, what=what, impl=impl, batch=batch, us=ms * 1e3, gb_s=gbs, pct_copy=100 * gbs / copy_gbs,
                         floor_us=nbytes / (copy_gbs * 1e9) * 1e6, copy_gb_s=copy_gbs))

    for batch in args.batch:
        model, cache, slot, x = block_setup(batch, args.context, dtype, device)
        run, idle = torch.zeros(1, dtype=torch.int32, device=device), torch.ones(1, dtype=torch.int32, device=device)
        fused, hybrid = Backend("triton"), Backend("triton", fused_max_rows=0)  # hybrid: cuBLAS + attention kernel

        def block(backend, skip=None):
            return lambda: model.run_layers(x, 0, 1, cache, slot, backend, skip=skip)

        paths = {"torch": block(TORCH), "torch matmuls + attention kernel": block(hybrid), "fused": block(fused),
                 "fused, flag clear": block(fused, run)}
        check_block(model, cache, slot, x, {name: fn() for name, fn in paths.items()})
        paths["fused, skipped (past the exit)"] = block(fused, idle)
        for name, fn in paths.items():
            nbytes = block_bytes(batch, args.context, elem, "skipped" in name)
            record("block", name, batch, kernel_ms(fn, device), nbytes)
        for what, (K, N, options) in matmuls(D).items():
            xm, w, b, kw = matmul_inputs(batch, K, N, options, dtype, device)
            want = fused_linear_ref(xm.double(), w.double(), b.double(), gelu=kw["gelu"],
                                    ln=tuple(t.double() if torch.is_tensor(t) else t for t in kw["ln"]) if "ln" in kw
                                    else None, residual=kw["residual"].double() if "residual" in kw else None)
            got = fused_linear(xm, w, b, **kw)
            if ((got.double() - want).norm() / want.norm()).item() > 1e-2:
                raise AssertionError(f"{what}, batch {batch}: fused_linear disagrees with float64")
            nbytes = (K * N + N) * elem
            record(what, "fused", batch, kernel_ms(lambda: fused_linear(xm, w, b, **kw), device), nbytes)
            record(what, "torch", batch, kernel_ms(lambda: fused_linear_ref(xm, w, b, **kw), device), nbytes)
            if args.sweep:
                for ms, cfg in sweep(batch, K, N, options, dtype, device)[:3]:
                    print(f"{what}, batch {batch}: {ms * 1e3:.1f} us with {cfg}")
    for r in rows:
        torch_row = next(x for x in rows if (x["batch"], x["what"], x["impl"]) == (r["batch"], r["what"], "torch"))
        r["speedup_vs_torch"] = torch_row["us"] / r["us"]
    path = write_results(rows, args.out, "fused_linear")
    print(f"{meta['device']}, {meta['dtype']}, d={D}, context {args.context}, copy bandwidth {copy_gbs:.0f} GB/s, "
          f"results in {path}")
    print(markdown_table(rows, ["what", "impl", "batch", "us", "gb_s", "pct_copy", "floor_us", "speedup_vs_torch"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- the pytest-benchmark suite (bench/conftest.py: device clock, cold L2, extra_info) ----
GEMV = Backend("triton", fused_max_rows=0, gemv_max_rows=8)
BLOCK_PATHS = {"fused": Backend("triton"), "torch matmuls + attention kernel": Backend("triton", fused_max_rows=0),
               "gemv": GEMV, "torch": TORCH, "fused, skipped (past the exit)": Backend("triton"),
               "gemv, skipped (past the exit)": GEMV}


def suite_shape(smoke: bool) -> tuple:
    """(d, heads, context, dtype): gpt2-medium's in fp16 on a GPU; a small fp32 one for the CPU smoke run."""
    return (64, 4, 16, torch.float32) if smoke else (D, HEADS, 160, torch.float16)


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("path", list(BLOCK_PATHS))
@pytest.mark.parametrize("cache_state", ["cold", "l2-warm"])
def test_block(benchmark, measure, gpu_only, device, path, batch, cache_state):
    if path.startswith("gemv") and batch > 8:
        pytest.skip("the GEMV takes at most 8 rows")
    """One gpt2-medium decode block (a predicated block with its skip flag set reads c_attn's key/value columns
    only). Cold: the L2 flushed before every call (what a decode step sees, 24 blocks of 25 MB); l2-warm: the
    same block replayed (its weights fit the 50 MB L2)."""
    d, heads, context, dtype = suite_shape(gpu_only)
    benchmark.group = f"block, batch {batch}, {cache_state}"
    model, cache, slot, x = block_setup(batch, context, dtype, device, d, heads)
    skip = torch.ones(1, dtype=torch.int32, device=device) if "skipped" in path else None
    elem = torch.finfo(dtype).bits // 8
    attended = cache.k.shape[3] if path == "torch" else context  # torch's attention reads the whole length bucket
    measure(lambda: model.run_layers(x, 0, 1, cache, slot, BLOCK_PATHS[path], skip=skip),
            block_bytes(batch, attended, elem, skip is not None, d), cold=cache_state == "cold", impl=path,
            batch=batch, d=d, context=context)


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("impl", ["fused", "gemv", "torch"])
@pytest.mark.parametrize("what", list(matmuls(D)))
def test_block_matmul(benchmark, measure, gpu_only, device, what, impl, batch):
    """Each of a block's four matmuls with its fused prologue / epilogue: the tiled fused-linear kernel, the
    loop-free GEMV (up to 8 rows), or cuBLAS and the torch ops around it (the reference)."""
    from mexit.kernels.fused_gemv import fused_gemv
    from mexit.kernels.fused_linear import fused_linear

    if impl == "gemv" and batch > 8:
        pytest.skip("the GEMV takes at most 8 rows")

    d, _, _, dtype = suite_shape(gpu_only)
    K, N, options = matmuls(d)[what]
    benchmark.group = f"{what}, batch {batch}"
    x, w, b, kw = matmul_inputs(batch, K, N, options, dtype, device)
    fn = {"fused": fused_linear, "gemv": fused_gemv, "torch": fused_linear_ref}[impl]
    elem = torch.finfo(dtype).bits // 8
    measure(lambda: fn(x, w, b, **kw), (K * N + N) * elem, impl=impl, batch=batch, K=K, N=N)
