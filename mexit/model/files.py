"""A checkpoint's files: which weight layout a folder (or hub repository) holds, and its tensors opened without
reading them (memory-mapped where the file allows), so that a loader reads each byte once.

Layouts, in transformers' order of preference: `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, `pytorch_model.bin`, sharded `.bin` with `pytorch_model.bin.index.json`. Beside the
weights travel config, tokenizer and side files (learned exit predictors, token counts: `METADATA_FILES`), all
written atomically (`replace_file`).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

LAYOUTS = (("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
           ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
PREDICTOR_FILE = "exit_predictors.safetensors"  # learned exit predictors (`predictors.py`)
TOKEN_COUNTS_FILE = "token_counts.safetensors"  # token frequencies (`token_counts.py`)
PROMPTS_FILE = "prompts.txt"  # prompts in the model's domain: `mexit ablate`'s default where a folder ships them
# what travels with the weights (downloads, convert, save_pretrained): the learned exit predictors too
METADATA_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, PREDICTOR_FILE, TOKEN_COUNTS_FILE,
                  PROMPTS_FILE)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


@dataclass
class StoredTensor:
    """One tensor of a checkpoint file, not read yet. `read()` returns it on the CPU in its stored dtype, backed by
    the file's pages where the file is memory-mapped (safetensors, zip-format `.bin`)."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def shard_names(index: Path) -> list[str]:
    """The shard files an index's `weight_map` lists, in order; a malformed index is a ValueError naming it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"{index} is not a valid weight index ({type(err).__name__}: {err})") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of `folder` in the first layout it holds. Raises FileNotFoundError naming a missing shard,
    or the layouts looked for."""
    for single, index, _ in LAYOUTS:
        if (folder / single).exists():
            return [folder / single]
        if (folder / index).exists():
            shards = shard_names(folder / index)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} shard(s) listed in {index} missing from {folder}: "
                                        f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
            return [folder / s for s in shards]
    raise FileNotFoundError(f"no weights in {folder}: expected one of "
                            f"{', '.join(name for layout in LAYOUTS for name in layout[:2])}")


def hub_patterns(repo_files: list[str]) -> list[str]:
    """What to download first of a hub repository holding `repo_files`: its metadata and the weight file or index of
    the first layout it holds (one layout only, as transformers does; a sharded layout's shards are those its
    index names)."""
    names = set(repo_files)
    for single, index, _ in LAYOUTS:
        if single in names:
            return [*METADATA_FILES, single]
        if index in names:
            return [*METADATA_FILES, index]
    return list(METADATA_FILES)


def open_safetensors(path: Path) -> dict[str, StoredTensor]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(path, framework="pt")
        slices = {name: handle.get_slice(name) for name in handle.keys()}
        stored = {}
        for name, piece in slices.items():
            dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
            if dtype is None:
                raise ValueError(f"tensor {name} has dtype {piece.get_dtype()}, which mexit does not read")
            stored[name] = StoredTensor(path, tuple(piece.get_shape()), dtype,
                                        lambda name=name: handle.get_tensor(name))
        return stored
    except (SafetensorError, OSError, RuntimeError) as err:  # bad header, short file, bad offsets
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted: {reason})") from None


def read_side_file(path: Path, remedy: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A small safetensors side file read whole: (tensors, metadata). Errors: a truncated or corrupted file is a
    ValueError naming it and `remedy` (how to write it again)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable safetensors file ({reason}): delete it or {remedy}") from None


def open_pickle(path: Path) -> dict[str, StoredTensor]:
    """A `.bin` with weights_only=True (a file holding other objects is refused without running it), memory-mapped
    when it is a zip (torch >= 1.6); legacy files are read whole."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f" (it asks for {found.group(1)})" if found else ""
        raise ValueError(f"refused to load {path}: it holds pickled objects other than tensors{detail}, and mexit "
                         "never runs a checkpoint's code; convert it to safetensors with a tool you trust") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted: {reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    stored = {}
    for name in list(state):  # the stored tensors own the data from here: popping one releases it
        tensor = state.pop(name)
        stored[name] = StoredTensor(path, tuple(tensor.shape), tensor.dtype, lambda tensor=tensor: tensor)
    return stored


def open_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of `folder`'s weights by name (in file order), opened but not read. A name stored in two shards
    is a ValueError naming both."""
    stored: dict[str, StoredTensor] = {}
    for path in weight_files(folder):
        opened = open_safetensors(path) if path.suffix == ".safetensors" else open_pickle(path)
        twice = sorted(set(opened) & set(stored))
        if twice:
            raise ValueError(f"{twice[0]} is stored in both {stored[twice[0]].file.name} and {path.name}")
        stored.update(opened)
    return stored


def file_mode() -> int:
    """The mode new files get (0666 less the umask), read without changing the umask where Linux shows it."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def replace_file(path: Path, write) -> None:
    """`write(temporary path)`, then the usual mode and an atomic rename onto `path`: a reader never sees half a
    file, and a read-only file of an earlier save is replaced, not opened for writing."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, file_mode())
    tmp.replace(path)
