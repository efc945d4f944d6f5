"""Count the device-kernel launches of a piece of work, the same way on CPU and GPU.

A launch is one Triton kernel launch (counted at the launcher, compiled or interpreted) or one torch operation
that launches a device kernel: every aten op reaching the dispatcher except views (outputs aliasing an input
without writing it), bare allocations and metadata queries. cuBLAS or SDPA may launch more than one kernel for an
op; counting each op once keeps the count hardware-independent. Operations a Triton kernel performs under the
interpreter are not counted as torch operations, nor are host reads (`.item()`) and the copy `torch.tensor(list)`
makes (it bypasses the dispatcher's Python mode). CUDA-graph replays dispatch nothing: count with the static
engine, which runs the same step uncaptured.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

from torch.utils._python_dispatch import TorchDispatchMode

# allocations and metadata: no kernel runs
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense", "size",
         "stride", "sym_size", "sym_stride", "is_same_size", "lift_fresh", "record_stream", "set_", "detach", "detach_",
         "alias", "resize_", "promote_types", "result_type", "can_cast", "item", "is_nonzero"}


def launches_kernel(func) -> bool:
    """Whether an aten op launches a device kernel: not a view (an output aliasing an input that it does not
    write), not an allocation or a metadata query."""
    name = func._schema.name.split("::")[-1]
    if name in _FREE:
        return False
    for ret in func._schema.returns:
        if ret.alias_info is not None and not ret.alias_info.is_write:
            return False
    return True


class _TorchOps(TorchDispatchMode):
    def __init__(self, counts: Counter, paused: list):
        super().__init__()
        self.counts, self.paused = counts, paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused[0] and launches_kernel(func):
            self.counts["torch:" + func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_launches():
    """with count_launches() as counts: ... -> Counter of "triton:<kernel>" and "torch:<op>" launches."""
    import triton.runtime.jit as jit

    counts: Counter = Counter()
    paused = [False]
    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    originals = {cls: cls.run for cls in classes}

    def counting(original):
        def run(self, *args, **kwargs):
            name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "kernel")
            counts["triton:" + name] += 1
            paused[0] = True  # the interpreter's own tensor work is part of this launch
            try:
                return original(self, *args, **kwargs)
            finally:
                paused[0] = False
        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    try:
        with _TorchOps(counts, paused):
            yield counts
    finally:
        for cls, original in originals.items():
            cls.run = original


def total(counts: Counter) -> dict:
    """{"triton": n, "torch": m, "launches": n + m}."""
    triton = sum(v for k, v in counts.items() if k.startswith("triton:"))
    torch_ops = sum(v for k, v in counts.items() if k.startswith("torch:"))
    return {"triton": triton, "torch": torch_ops, "launches": triton + torch_ops}
