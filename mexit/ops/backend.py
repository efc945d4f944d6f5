"""Which backend runs the ops: `resolve_backend` turns a user's choice (auto / torch / triton, pdl) into a `Backend`,
probing the kernels once per device for "auto"."""

from __future__ import annotations

import os
import warnings

import torch

from mexit.kernels.launch import pdl_supported

from . import FUSED_MAX_ROWS, Backend
from .probe import probe_kernels

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device, pdl: bool = False,
                    fused_max_rows: int = FUSED_MAX_ROWS) -> Backend:
    """"auto" -> triton on CUDA when triton imports and the kernels compile and agree with their references on a
    small probe, else torch with a warning. "triton" on CPU needs TRITON_INTERPRET=1 set before triton was
    imported. pdl where it cannot run warns and is switched off."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use one of {BACKENDS}")
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            problem = None if triton_available() else "triton is not installed"
            problem = problem or probe_kernels(device)
            if problem:
                warnings.warn(f"the Triton kernels cannot run on {device} ({problem}): using the PyTorch reference "
                              "path (slower)", stacklevel=3)
            else:
                name = "triton"
    elif name == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' was asked for but triton is not installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend 'triton' on CPU needs TRITON_INTERPRET=1 in the environment before start")
    if pdl and not (name == "triton" and pdl_supported(device)):
        warnings.warn("pdl=True needs the triton backend and a CUDA GPU of compute capability 9.0 or newer: running "
                      "without programmatic dependent launch", stacklevel=3)
        pdl = False
    return Backend(name, fused_max_rows=fused_max_rows, pdl=pdl)
