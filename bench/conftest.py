"""The pytest-benchmark suite's plumbing (`python -m pytest bench --benchmark-only -p no:xdist`): one device clock
(`mexit.timing.DeviceClock`: CUDA events on a GPU, perf_counter with the thread count on CPU), cold weights by
default (the L2 cache flushed before every round on a GPU; an L2-warm variant only where a test says so), and on
every row `extra_info` with the bytes moved, GB/s, the percent of the card's measured copy bandwidth, the floor
and the launches of one call; `machine_info` carries the device, its copy bandwidth, the versions and the commit.

Kernel benchmarks are GPU measurements: on CPU they skip with the reason, and under `--benchmark-disable` (the
README's test command) they run once on a small shape under the Triton interpreter, as a smoke test. The decode
benchmarks (`bench_decode.py`) measure on CPU too.

`--bench-slowdown-ms MS` adds a sleep to every timed call: the regression check's own test
(`--benchmark-compare-fail`) makes a benchmark slower on purpose with it."""

import functools
import os
import time

# one thread per xdist worker and the commands it starts (tests/conftest.py says why); a user's setting stays
ONE_THREAD = bool(os.environ.get("PYTEST_XDIST_WORKER")) and "OMP_NUM_THREADS" not in os.environ
if ONE_THREAD:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if ONE_THREAD:
    torch.set_num_threads(1)

import pytest  # noqa: E402

from mexit.timing import DeviceClock  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-slowdown-ms", type=float, default=0.0,
                     help="add this many ms of sleep to every timed call (to test regression checks)")


@functools.cache
def copy_gbs(device_type: str) -> float:
    """The device's measured copy bandwidth (GB/s, bytes read + written): the roofline's denominator."""
    from mexit.bench.common import copy_bandwidth_gbs

    return round(copy_bandwidth_gbs(torch.device(device_type)), 1)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_benchmark_update_machine_info(config, machine_info):
    from mexit.bench.common import run_metadata

    device = bench_device()
    meta = run_metadata(device, None)
    machine_info["mexit"] = {k: v for k, v in meta.items() if k not in ("dtype", "time")}
    machine_info["mexit"]["copy_gbs"] = copy_gbs(device.type)
    machine_info["mexit"]["cuda"] = torch.version.cuda
    machine_info["mexit"]["interpreted"] = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@functools.cache
def _flush_buffer(index: int) -> torch.Tensor:
    l2 = torch.cuda.get_device_properties(index).L2_cache_size
    return torch.empty(2 * l2 // 4, dtype=torch.float32, device=f"cuda:{index}")


def flush_l2(device: torch.device) -> None:
    """Evict the L2 cache: write a buffer of twice its size (the next reads of any weight come from memory), then
    keep the device busy for about 50 us so that the timed call's launches queue behind it: a round then times
    the device's work, not the host's launches."""
    if device.type == "cuda":
        _flush_buffer(device.index or 0).zero_()
        torch.cuda._sleep(100_000)


@pytest.fixture
def measure(benchmark, device, request):
    """measure(fn, nbytes, cold=True, rounds=None, floor_bytes=None) -> the median ms (None when benchmarks are
    disabled: fn then runs once). Times fn() with pytest-benchmark's pedantic mode on the device clock (the L2
    flushed before each round unless cold=False), after one call whose launches are counted; fills extra_info."""
    slowdown = request.config.getoption("--bench-slowdown-ms") / 1e3

    def run(fn, nbytes: int, cold: bool = True, rounds: int | None = None, **extra):
        from mexit.ops.launches import count_launches, total

        timed = fn if not slowdown else (lambda: (fn(), time.sleep(slowdown)))
        with torch.inference_mode():
            with count_launches() as launched:
                fn()
            clock = DeviceClock(device)
            benchmark._timer = clock
            benchmark.extra_info.update(extra, launches=total(launched)["launches"], bytes=nbytes,
                                        cold=cold and device.type == "cuda", **clock.describe())
            setup = (lambda: flush_l2(device)) if cold and device.type == "cuda" else None
            benchmark.pedantic(timed, setup=setup, rounds=rounds or (100 if device.type == "cuda" else 10),
                               warmup_rounds=3, iterations=1)
        if benchmark.disabled:
            return None
        median_s = benchmark.stats.stats.median
        gbs = nbytes / median_s / 1e9
        bandwidth = copy_gbs(device.type)
        benchmark.extra_info.update(gb_s=round(gbs, 1), pct_copy=round(100 * gbs / bandwidth, 2),
                                    floor_us=round(nbytes / (bandwidth * 1e9) * 1e6, 3), copy_gbs=bandwidth)
        return median_s * 1e3

    return run


@pytest.fixture
def gpu_only(benchmark, device):
    """Skip a kernel benchmark on CPU unless benchmarks are disabled (then it is a smoke run of its code under the
    interpreter). Returns whether this is the smoke run (use a small shape)."""
    if device.type != "cuda" and not benchmark.disabled:
        pytest.skip("a kernel's time under the CPU interpreter is not a measurement: run on a CUDA GPU "
                    "(on CPU, --benchmark-disable runs it once as a smoke test)")
    return device.type != "cuda"
