"""One device clock for every measurement mexit reports: the pytest-benchmark suite (`bench/`), `mexit bench`,
`mexit ablate` and the CLI's `--json` timings.

On a GPU a mark is a CUDA event recorded on the current stream, so an interval is the device's own time between
two points of the stream (work queued before the first mark is not in it); on the CPU a mark is
`time.perf_counter()`, and the thread count of CPU ops is reported with it. torch is imported only when a clock
is made for a CUDA device."""

from __future__ import annotations

import time


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
