"""Which backend runs the ops: `resolve_backend` turns a user's choice (auto / torch / triton, pdl, the block-linear
cut-offs) into a `Backend`, probing the kernels once per device for "auto" and taking what the user left open from
the card's measurements (`routes.py`)."""

from __future__ import annotations

import os
import warnings

import torch

from mexit.kernels.launch import pdl_supported

from . import FUSED_MAX_ROWS, Backend
from .probe import probe_gemv, probe_kernels
from .routes import card_name, measured_route

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device, pdl: bool | None = None, fused_max_rows: int | None = None,
                    gemv_max_rows: int | None = None) -> Backend:
    """"auto" -> triton on CUDA when triton imports and the kernels compile and agree with their references on a
    small probe, else torch with a warning. "triton" on CPU needs TRITON_INTERPRET=1 set before triton was
    imported. Settings left None follow the card's measurements on CUDA (`routes.measured_route`: cuBLAS block
    linears and PDL off on every card measured so far), and elsewhere run the kernels wherever they can
    (`Backend`'s defaults; PDL off). pdl where it cannot run warns and is switched off."""
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
    route = dict(fused_max_rows=FUSED_MAX_ROWS, gemv_max_rows=0, pdl=False)
    if name == "triton" and device.type == "cuda":
        route = measured_route(card_name(device))
    if pdl is None:
        pdl = route["pdl"] and pdl_supported(device)
    elif pdl and not (name == "triton" and pdl_supported(device)):
        warnings.warn("pdl=True needs the triton backend and a CUDA GPU of compute capability 9.0 or newer: running "
                      "without programmatic dependent launch", stacklevel=3)
        pdl = False
    gemv_max_rows = route["gemv_max_rows"] if gemv_max_rows is None else gemv_max_rows
    if name == "triton" and device.type == "cuda" and gemv_max_rows and (problem := probe_gemv(device)):
        warnings.warn(f"the GEMV block linears cannot run on {device} ({problem}): using the other paths",
                      stacklevel=3)
        gemv_max_rows = 0
    if name != "triton":
        if gemv_max_rows or fused_max_rows is not None:
            warnings.warn(f"the block-linear cut-offs apply to the triton backend: the {name} backend runs torch's "
                          "matmuls", stacklevel=3)
        return Backend(name)
    return Backend(name, pdl=pdl, gemv_max_rows=gemv_max_rows,
                   fused_max_rows=route["fused_max_rows"] if fused_max_rows is None else fused_max_rows)
