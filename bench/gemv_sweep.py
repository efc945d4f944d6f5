"""Cold-weight sweep of the block linears at decode batch sizes: the loop-free GEMV (`fused_gemv`) over its launch
settings, the tiled fused-linear kernel at its settings, and cuBLAS with the torch ops around it (the reference
path), on the same weights.

Cold: each candidate runs over COPIES distinct weight copies (24 by default: 24 x 8 MB is about 4x an H100/H200's
50 MB L2), one launch per copy, all captured in one CUDA graph and replayed; a launch's time is the replay's device
time over the copies, so no weight is served from L2 (what a decode step sees: 24 blocks of 25 MB in a row).
Every candidate is first checked against the float64 reference. Prints the top settings per matrix and batch and
writes every row (us, GB/s, % of copy bandwidth) to <out>/gemv_sweep.csv / .json.

    python -m mexit.bench.gemv_sweep --batch 1 8 --out results          # on a CUDA GPU, fp16, gpt2-medium shapes
    python -m mexit.bench.gemv_sweep --batch 1 --wide                   # every GEMV BLOCK_N x warps
    TRITON_INTERPRET=1 python -m mexit.bench.gemv_sweep --smoke         # the CPU dry run (tiny shapes, no timing)
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from mexit.bench.bench_fused_linear import matmul_inputs, matmuls
from mexit.bench.common import copy_bandwidth_gbs, markdown_table, run_metadata, write_results
from mexit.kernels.fused_linear_ref import fused_linear_ref

BLOCK_N = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8)


def candidates(batch: int, K: int, N: int, smoke: bool, wide: bool = False) -> dict:
    """name -> (fn(x, w, b, kw), config): the GEMV (<= 8 rows) at its default settings and their neighbours
    (BLOCK_N and warps halved / doubled; wide: every BLOCK_N x warps), with at least 8 elements per thread, the
    tiled kernel at its settings, cuBLAS + torch ops."""
    import triton

    from mexit.kernels.fused_gemv import MAX_ROWS, fused_gemv, gemv_config
    from mexit.kernels.fused_linear import fused_linear, tile_config

    out = {"cublas": (fused_linear_ref, None), "tiled": (fused_linear, tile_config(batch, N))}
    if batch <= MAX_ROWS:
        block_k = triton.next_power_of_2(K)
        chosen = gemv_config(batch, N, K)
        n0, w0 = chosen["BLOCK_N"], chosen["num_warps"]
        grid = itertools.product(BLOCK_N, WARPS) if wide else itertools.product((n0 // 2, n0, n0 * 2),
                                                                               (w0 // 2, w0, w0 * 2))
        for block_n, warps in [(1, 1), (2, 1)] if smoke else grid:
            if not (block_n and warps) or (block_n * block_k < 8 * 32 * warps and not smoke):
                continue
            cfg = dict(chosen, BLOCK_N=block_n, num_warps=warps)
            mark = " (default)" if (block_n, warps) == (chosen["BLOCK_N"], chosen["num_warps"]) else ""
            out[f"gemv n={block_n} w={warps}{mark}"] = (fused_gemv, cfg)
        if smoke:
            out["tiled"] = (fused_linear, None)  # the interpreter's own tiles
    return out


def run_cold(fn, inputs: list, device: torch.device) -> float:
    """Microseconds per launch of fn over the distinct inputs, one CUDA graph replayed (device time)."""
    from mexit.timing import DeviceClock

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for args in inputs:  # compile and warm up outside the capture
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in inputs:
            fn(*args)
    clock = DeviceClock(device)
    graph.replay()
    times = []
    for _ in range(5):
        times.append(clock.time_ms(graph.replay))
    return sorted(times)[len(times) // 2] * 1e3 / len(inputs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--copies", type=int, default=24, help="distinct weight copies per candidate (cold)")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--wide", action="store_true", help="every GEMV BLOCK_N x warps, not only the default's neighbours")
    p.add_argument("--smoke", action="store_true", help="CPU dry run under TRITON_INTERPRET=1: tiny shapes, the "
                   "candidates checked against float64, nothing timed")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch = [3]  # one odd batch: masked rows
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        print("error: gemv_sweep times a CUDA GPU (--smoke: the CPU dry run)", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.smoke else torch.float16
    d = 64 if args.smoke else 1024
    copy_gbs = None if args.smoke else copy_bandwidth_gbs(device)
    meta = run_metadata(device, dtype)
    rows = []
    shapes = matmuls(d)
    if args.smoke:  # a layernorm matrix and a residual one: every kind of candidate once
        shapes = {k: shapes[k] for k in ("c_fc (ln_2, gelu)", "mlp c_proj (+res)")}
    for batch, (what, (K, N, options)) in itertools.product(args.batch, shapes.items()):
        copies = [matmul_inputs(batch, K, N, options, dtype, device) for _ in range(1 if args.smoke else args.copies)]
        for i, copy in enumerate(copies):
            copy[1].add_(i * 1e-3)  # distinct weights (matmul_inputs seeds by shape)
        x, w, b, kw = copies[0]
        want = fused_linear_ref(x.double(), w.double(), b.double(), gelu=kw["gelu"],
                                ln=(kw["ln"][0].double(), kw["ln"][1].double(), kw["ln"][2]) if "ln" in kw else None,
                                residual=kw["residual"].double() if "residual" in kw else None)
        elem = torch.finfo(dtype).bits // 8
        nbytes = (K * N + N) * elem
        for name, (kernel, cfg) in candidates(batch, K, N, args.smoke, args.wide).items():
            def fn(x, w, b, kw, kernel=kernel, cfg=cfg):
                return kernel(x, w, b, **kw) if cfg is None else kernel(x, w, b, config=cfg, **kw)

            got = fn(x, w, b, kw)
            err = ((got.double() - want).norm() / want.norm()).item()
            if err > 1e-2:
                raise AssertionError(f"{what}, batch {batch}, {name}: relative error {err:.2e} against float64")
            row = dict(meta, what=what, batch=batch, impl=name, rel_err=err)
            if not args.smoke:
                us = run_cold(lambda x, w, b, kw: fn(x, w, b, kw), copies, device)
                gbs = nbytes / (us * 1e-6) / 1e9
                row.update(us=us, gb_s=gbs, pct_copy=100 * gbs / copy_gbs, copies=args.copies, cold=True)
            rows.append(row)
    if args.smoke:
        print(f"SMOKE (interpreter, not a measurement): {len(rows)} candidates agree with float64")
        return 0
    path = write_results(rows, args.out, "gemv_sweep")
    best = []
    for _, group in itertools.groupby(sorted(rows, key=lambda r: (r["what"], r["batch"], r["us"])),
                                        key=lambda r: (r["what"], r["batch"])):
        group = list(group)
        best += group[: args.top] + [r for r in group[args.top:] if r["impl"] in ("cublas", "tiled")]
    print(f"{meta['device']}, fp16, cold ({args.copies} weight copies per candidate), copy {copy_gbs:.0f} GB/s, "
          f"rows in {path}")
    print(markdown_table(best, ["what", "batch", "impl", "us", "gb_s", "pct_copy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
