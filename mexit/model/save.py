"""Write checkpoints as transformers does: safetensors (sharded with an index above a size), `config.json` keeping
the source's fields, and the source's `generation_config.json` and tokenizer files; `convert` rewrites any layout
`load` reads in a chosen dtype."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .checkpoint import RANDOM_KEY, HubOptions, load, resolve_folder, state_dict_from_weights
from .decoder import MultiExitGPT2
from .files import LAYOUTS, METADATA_FILES, PREDICTOR_FILE, TOKEN_COUNTS_FILE, replace_file
from .predictors import save_predictors
from .token_counts import save_token_counts

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as huggingface_hub counts


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "2GB", "500MB", "20000" (decimal units). Raises ValueError naming the
    value."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", str(size).upper())
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"shard size {size!r} is not a positive size such as 2GB, 500MB or a number of bytes")
    return int(float(found.group(1)) * SIZE_UNITS.get(found.group(2), 1))


def weight_file_in(folder: Path) -> str | None:
    """The first weight file, index or shard `folder` holds, if any."""
    named = (name for single, index, _ in LAYOUTS for name in (single, index) if (folder / name).exists())
    return next(named, None) or next((p.name for *_, shards in LAYOUTS for p in folder.glob(shards)), None)


def write_checkpoint(state: dict[str, torch.Tensor], folder: str | os.PathLike, config: dict,
                     source: Path | None = None, max_shard_size: int | str = "5GB") -> Path:
    """Write `state` (checkpoint names -> CPU tensors) as safetensors shards of at most `max_shard_size` (one
    `model.safetensors` when it fits, else `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`),
    `config` as config.json, and copy `source`'s generation_config.json and tokenizer files. Every file is written
    under a temporary name and renamed (`replace_file`); safetensors files of an earlier save that the new one does
    not use are removed (they would shadow it). A progress bar shows on a terminal for writes over 1 GB."""
    from huggingface_hub import constants, split_state_dict_into_shards_factory
    from safetensors.torch import save_file
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # each tensor counts its own bytes: per-layer views of one stacked buffer are distinct tensors on disk
    split = split_state_dict_into_shards_factory(state, get_storage_size=lambda t: t.nbytes,
                                                 filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN,
                                                 max_shard_size=parse_size(max_shard_size))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {folder.name}",
              disable=None if total > 1e9 else True, leave=False) as bar:
        for filename, names in split.filename_to_tensors.items():
            # safetensors refuses tensors that share storage: per-layer views of stacked buffers are copied here,
            # one shard at a time
            part = {n: state[n].clone() if state[n].untyped_storage().nbytes() > state[n].nbytes else state[n]
                    for n in names}
            replace_file(folder / filename, lambda tmp, part=part: save_file(part, tmp, metadata={"format": "pt"}))
            bar.update(sum(t.nbytes for t in part.values()))
            del part
    single, index, _ = LAYOUTS[0]
    if split.is_sharded:
        index_text = json.dumps({"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}, indent=2)
        replace_file(folder / index, lambda tmp: tmp.write_text(index_text + "\n"))
    kept = {*split.filename_to_tensors, *([index] if split.is_sharded else [])}
    for path in [*folder.glob("model-*-of-*.safetensors"), folder / single, folder / index]:
        if path.exists() and path.name not in kept:
            path.unlink()
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    replace_file(folder / "config.json", lambda tmp: tmp.write_text(config_text))
    if source is not None and source.resolve() != folder.resolve():
        for name in METADATA_FILES:
            if name != "config.json" and (source / name).is_file():
                replace_file(folder / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
    return folder


def config_of(model: MultiExitGPT2) -> dict:
    """config.json for `model`: the source folder's, with every field kept (`architectures`, custom fields...),
    else the one its shape implies; the dtype, exit layers and head tying are those of `model` (a stored head that the
    source's config called tied is written untied)."""
    source = model.folder / "config.json" if model.folder is not None else None
    if source is not None and source.is_file():
        config = json.loads(source.read_text())
    else:
        config = json.loads(model.config.to_hf().to_json_string(use_diff=True))
    config.pop(RANDOM_KEY, None)
    if model.random_weights:
        config[RANDOM_KEY] = True
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    if "dtype" in config:  # transformers 5's name for it
        config["dtype"] = config["torch_dtype"]
    if model.config.exit_layers:
        config["lm_head_layer_indices"] = list(model.config.exit_layers)
    if not model.config.tie_word_embeddings:
        config["tie_word_embeddings"] = False
    return config


def save_checkpoint(model, folder: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` (a MultiExitGPT2, or the MultiExitLM `mexit.load` returns) in transformers' GPT-2 layout plus
    the exit heads, in its dtype: loads in mexit and in transformers' GPT2LMHeadModel (the exit heads reported as
    unexpected keys). See `write_checkpoint`. The model's learned exit predictors and token counts are written where
    its source folder has none to copy; a random-weight model stays labelled so (`RANDOM_KEY` in config.json).
    Raises TypeError for anything else."""
    model = getattr(model, "model", model)  # MultiExitLM holds its MultiExitGPT2
    if not isinstance(model, MultiExitGPT2):
        raise TypeError(f"save_checkpoint writes a mexit model (mexit.load's or mexit.random_model's), got "
                        f"{type(model).__name__}")
    out = write_checkpoint(state_dict_from_weights(model.w, model.config), folder, config_of(model), model.folder,
                           max_shard_size)
    def copied(name: str) -> bool:  # write_checkpoint copied the source folder's file (with its metadata)
        return model.folder is not None and (model.folder / name).is_file()

    if model.predictors is not None and not copied(PREDICTOR_FILE):
        save_predictors(out, model.predictors)
    if model.token_counts is not None and not copied(TOKEN_COUNTS_FILE):
        save_token_counts(out, model.token_counts, ["random"] if model.random_weights else [])
    return out


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype=None, max_shard_size: int | str = "2GB",
            check_weights: bool = True, hub: HubOptions | None = None) -> Path:
    """Rewrite the checkpoint `src` (folder or hub id, any layout `load` reads) into the new folder `out` as
    safetensors in `dtype` (None: the stored dtype). Peak memory is the weights in `dtype` plus one shard's
    per-layer tensors. Raises ValueError when `out` is a file or already holds weights, before anything is read; a
    failed conversion removes the folder it created."""
    out = Path(out)
    parse_size(max_shard_size)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; convert writes into a folder")
    if out.exists() and (found := weight_file_in(out)):
        raise ValueError(f"{out} already holds weights ({found}); convert writes into a new or weight-free folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create {out} ({err.strerror or err})") from None
    try:
        model = load(resolve_folder(src, hub or HubOptions()), dtype=dtype or "auto", device="cpu",
                     check_weights=check_weights)
        return save_checkpoint(model, out, max_shard_size)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
