"""The default kernel choices of a CUDA card follow its measurements: `routes.json` (beside this file) holds, per
card name, the block-linear path (`gemv_max_rows`, `fused_max_rows`) and the PDL setting that were fastest on it,
written by the perf stage of `bench/gpu_check.sh`; a card never measured gets the entry "default" (the fastest
path measured on any card so far). An unmeasured kernel is never a default: it is opt-in until a run ranks it."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

ROUTES_FILE = Path(__file__).with_name("routes.json")
FIELDS = ("fused_max_rows", "gemv_max_rows", "pdl")


@functools.cache
def _table() -> dict:
    return json.loads(ROUTES_FILE.read_text())


def card_name(device: torch.device) -> str:
    """The GPU's name as torch reports it ("NVIDIA H200"), the key of `routes.json`."""
    return torch.cuda.get_device_name(device)


def measured_route(card: str) -> dict:
    """{"fused_max_rows", "gemv_max_rows", "pdl", "measured", "card"} for `card`: its own entry, else the
    default's (then "card" says "default")."""
    table = _table()
    entry = table["cards"].get(card)
    return dict(entry or table["default"], card=card if entry else "default")
