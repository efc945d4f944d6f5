"""Host-side launch settings the kernels share: programmatic dependent launch (PDL), the interpreter's tiles."""

from __future__ import annotations

import functools
import os

import torch


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on `device` can use PDL: a compiled (not interpreted) launch on a Hopper or newer GPU."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capability(device) >= 9


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def interpreted() -> bool:
    """Whether kernels run under Triton's interpreter (CPU tensors): each program then runs one after another in
    Python, so the launch settings use few, large tiles instead of the GPU's many small ones."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pdl_options(pdl: bool) -> dict:
    """Launch options of a kernel built with USE_PDL=pdl: launched with the programmatic-serialization attribute,
    so it may start while the kernel before it finishes (its `gdc_wait` holds it before any dependent read)."""
    return {"launch_pdl": True} if pdl else {}
