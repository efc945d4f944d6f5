"""One device clock for every measurement mexit reports: the pytest-benchmark suite (`bench/`), `mexit bench`,
`mexit ablate` and the CLI's `--json` timings.

On a GPU a mark is a CUDA event recorded on the current stream, so an interval is the device's own time between
two points of the stream (work queued before the first mark is not in it); on the CPU a mark is
`time.perf_counter()`, and the thread count of CPU ops is reported with it. torch is imported only when a clock
is made for a CUDA device. Timings compared in interleaved pairs are summarized one way everywhere: the geometric
mean of the pairs' ratios with a 95% Student-t interval on their logarithms (`ratio_interval`)."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable

# Student t quantiles at 0.975 for 1..30 degrees of freedom (two-sided 95%); above, the Cornish-Fisher expansion
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with df >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 samples (df >= 1), got df={df}")
    return T975[df - 1] if df <= len(T975) else 1.959964 + 2.3722 / df


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean of `values` (one value says nothing of the noise: an
    unbounded interval)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, -math.inf, math.inf
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def ratio_interval(logs: list[float]) -> tuple[float, float, float]:
    """(ratio, low, high): the geometric mean of the ratios whose logarithms are `logs`, with its 95% interval."""
    m, lo, hi = mean_interval(logs)
    return math.exp(m), math.exp(lo), math.exp(hi)


def interleaved_pairs(reference: Callable[[int, int], float], setting: Callable[[int, int], float], passes: int,
                      units: int = 1) -> list[list[float]]:
    """Timing pairs [[reference, setting], ...], one per pass: reference(pass, unit) and setting(pass, unit) time one
    unit of work (a batch, a call) and return its time; within a pass the two alternate which runs first by pass +
    unit (the reference first where it is even: drift falls on both), and a pass sums its units. The garbage
    collector runs before each pass and is paused during it (timeit's rule)."""
    pairs = []
    for p in range(passes):
        gc.collect()
        gc.disable()
        try:
            pair = [0.0, 0.0]
            for u in range(units):
                order = ((0, reference), (1, setting)) if (p + u) % 2 == 0 else ((1, setting), (0, reference))
                for side, run in order:
                    pair[side] += run(p, u)
        finally:
            gc.enable()
        pairs.append(pair)
    return pairs


class DeviceClock:
    """Marks and intervals on `device` (a torch.device or its type string).

    mark(): a point in the device's stream (no wait); ms(start, end): milliseconds between two marks (waits for
    `end`). Calling the clock is pytest-benchmark's `timer` (`benchmark._timer`, which takes `end - start`): on a
    GPU it returns a mark whose difference with another is their seconds apart (waiting only for the later one),
    so a round is the device's time from the first mark to the second and the start does not stall the host; on
    CPU, perf_counter()."""

    def __init__(self, device):
        self.cuda = str(getattr(device, "type", device)).startswith("cuda")

    def mark(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def __call__(self):
        return _Mark(self, self.mark()) if self.cuda else time.perf_counter()

    def time_ms(self, fn) -> float:
        """Milliseconds of one call of fn() (device time on a GPU; the device is idle before it starts)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        start = self.mark()
        fn()
        return self.ms(start, self.mark())

    def describe(self) -> dict:
        """What the clock measures: {"clock": "cuda events" | "perf_counter", "threads": CPU ops' threads}."""
        import torch

        return {"clock": "cuda events" if self.cuda else "perf_counter", "threads": torch.get_num_threads()}


class _Mark:
    """A clock reading on the device: `later - earlier` is seconds (waits for `later`)."""

    def __init__(self, clock: DeviceClock, event):
        self.clock, self.event = clock, event

    def __sub__(self, earlier: _Mark) -> float:
        return self.clock.ms(earlier.event, self.event) / 1e3
