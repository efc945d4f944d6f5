"""Shared benchmark plumbing: device-side timing, measured copy bandwidth, run metadata, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mexit.frontends.output import HelpFormatter
from mexit.version import dependency_versions

if TYPE_CHECKING:
    import torch


# what one decode step (speculative decoding: one token of a row) read, in rows of mexit bench and mexit ablate:
# blocks, heads ([V, d] each; restricted draft heads count their share), key/value-propagated blocks, predictors
TRAFFIC = ("blocks_per_step", "heads_per_step", "fill_blocks_per_step", "predictors_per_step")


def run_metadata(device: torch.device, dtype) -> dict:
    """Device name, versions and commit: every results row carries these."""
    import torch

    meta = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),  # CPU ops' threads (torch.set_num_threads / OMP_NUM_THREADS)
        "load_avg_1m": round(os.getloadavg()[0], 2),  # runnable processes on the machine when the run started
        **dependency_versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta["commit"] = source_commit()
    return meta


def source_commit(here: Path | None = None) -> str | None:
    """The short commit of the checkout holding `here` (default: this folder), "+dirty" when a tracked source file
    anywhere in it (Python, the routes table) differs from it, so a result is never stamped with code that did not
    run; None outside a git checkout."""
    here = here or Path(__file__).resolve().parent

    def git(*argv) -> str:
        return subprocess.run(["git", *argv], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)*.py", ":(top)*routes.json")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if changed else "")) or None


def time_ms(fn, device: torch.device, warmup: int = 3, repeats: int = 10) -> list[float]:
    """Per-call times in ms on the device clock (`mexit.timing.DeviceClock`: CUDA events around each call on a GPU,
    perf_counter on CPU), after warm-up calls."""
    from mexit.timing import DeviceClock

    clock = DeviceClock(device)
    for _ in range(warmup):
        fn()
    return [clock.time_ms(fn) for _ in range(repeats)]


def kernel_ms(fn, device: torch.device, graph: bool = True) -> float:
    """Median ms of one call: triton's do_bench (in a replayed CUDA graph when `graph`) on GPU; a few host-clock
    calls on CPU."""
    import triton.testing

    if device.type != "cuda":
        return statistics.median(time_ms(fn, device, warmup=1, repeats=3))
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def kernel_bench_target(dtype: str, script: str) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) of a kernel benchmark script: a CUDA GPU. None (after saying why) without one: the CPU smoke
    run of the same kernels is the pytest-benchmark suite under --benchmark-disable (the README's test command)."""
    import torch

    from mexit.model.placement import resolve_dtype

    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU (on CPU: python -m pytest bench --benchmark-disable runs its benchmarks "
              "once under the interpreter; the kernels' checks are in tests/)", file=sys.stderr)
        return None
    return torch.device("cuda"), resolve_dtype(dtype)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured copy bandwidth in GB/s (device-to-device on GPU, memory-to-memory on CPU), counting bytes read
    plus bytes written; median of repeated copies."""
    import torch

    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 28)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = sorted(time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=15))[7]
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def read_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured read bandwidth in GB/s: a matrix-vector product over a matrix larger than any cache (fp16 on GPU,
    fp32 on CPU, all cores), the access pattern of a decode step streaming its weights; median of repeats."""
    import torch

    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 28)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cols = 4096
    weight = torch.empty(nbytes // (cols * dtype.itemsize), cols, dtype=dtype, device=device).normal_()
    x = torch.randn(cols, dtype=dtype, device=device)
    ms = statistics.median(time_ms(lambda: torch.mv(weight, x), device, warmup=3, repeats=15))
    return weight.numel() * dtype.itemsize / (ms * 1e-3) / 1e9


def set_threads(threads: int | None, device) -> None:
    """CPU ops' thread count for a benchmark: `threads`, else OMP_NUM_THREADS when set, else 1 on a CPU device
    (with two threads a busy 2-core machine gave 5x slower and 3x noisier steps than with one). CUDA runs keep
    torch's default (the host only launches work)."""
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS") is None and device.type == "cpu":
        threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def spread_note(median: float, low: float, high: float, limit: float = 0.25) -> str | None:
    """A note when repeats spread more than `limit` of their median (a busy machine; compare within one run)."""
    if median > 0 and (high - low) / median > limit:
        return (f"wide spread: {low:.4g}..{high:.4g} around {median:.4g} (more than {limit:.0%}); the machine was "
                "busy or the run too short")
    return None


def write_results(rows: list[dict], out_dir: str | Path, stem: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def add_subcommand(sub, name: str, help: str, add_arguments, main_args) -> None:
    """Register a benchmark as a `mexit` subcommand."""
    p = sub.add_parser(name, help=help, description=sys.modules[add_arguments.__module__].__doc__,
                       formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(run=main_args)


def script_main(doc: str, add_arguments, main_args, argv=None) -> int:
    """Run a benchmark as a script (`python bench/NAME.py ...`)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, allow_abbrev=False)
    add_arguments(p)
    return main_args(p.parse_args(argv))


def launches_per_step(lm, prompts, kw: dict, steps: int = 3) -> dict:
    """Launches of one decode step of `lm.generate(prompts, ..., **kw)`, averaged over `steps` steps: the count of
    a generation of steps + 1 tokens minus that of 1 token, on the static engine when `lm` captures graphs (the
    same step, uncaptured), else on `lm`'s own engine."""
    import torch

    from mexit.frontends.api import MultiExitLM
    from mexit.ops.launches import count_launches, total

    counter = lm
    if lm.engine == "graph":
        counter = MultiExitLM(lm.model, lm.tokenizer, backend=lm.backend, engine="static")
    with torch.inference_mode():
        counter.generate(prompts, steps + 1, eos_token_id=None, **kw)  # warm: compilation, probes, buffers
        with count_launches() as one:
            counter.generate(prompts, 1, eos_token_id=None, **kw)
        with count_launches() as many:
            counter.generate(prompts, steps + 1, eos_token_id=None, **kw)
    a, b = total(one), total(many)
    return {k: (b[k] - a[k]) / steps for k in a}
