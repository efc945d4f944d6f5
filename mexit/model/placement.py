"""Where a model runs: a device and a dtype from what a user wrote (names, indexes, torch objects), with mexit's
default (fp16 on CUDA, fp32 elsewhere: `mexit.load` and the CLI; the drop-in keeps the stored dtype, as transformers 5
does)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device | None = None) -> torch.dtype:
    """A dtype name or torch dtype; None: mexit's default, fp16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif str(dtype).lower() in DTYPES:
        return DTYPES[str(dtype).lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of fp32, fp16, bf16")


def resolve_device(device) -> torch.device:
    """A device name, index or torch.device as cpu or cuda; None / "auto": cuda when available."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but this torch build sees no CUDA GPU")
    return device
