"""Helpers for kernel tests: where kernels run, and poisoned output allocation."""

import contextlib

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run under TRITON_INTERPRET=1


@contextlib.contextmanager
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like made inside the block is filled with NaN (floats) or -7 (ints), so an
    output element a kernel forgets to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
        m.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
        yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
