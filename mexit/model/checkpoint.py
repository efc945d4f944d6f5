"""Load and save multi-exit GPT-2 checkpoints (transformers' on-disk format), and build random-weight models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ModelConfig
from .decoder import MultiExitGPT2, Weights

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# checkpoint name suffix (after "transformer.h.{i}.") -> (Weights field, transpose needed)
_BLOCK_TENSORS = {
    "ln_1.weight": "ln_1_w", "ln_1.bias": "ln_1_b",
    "attn.c_attn.weight": "attn_w", "attn.c_attn.bias": "attn_b",
    "attn.c_proj.weight": "attn_proj_w", "attn.c_proj.bias": "attn_proj_b",
    "ln_2.weight": "ln_2_w", "ln_2.bias": "ln_2_b",
    "mlp.c_fc.weight": "fc_w", "mlp.c_fc.bias": "fc_b",
    "mlp.c_proj.weight": "fc_proj_w", "mlp.c_proj.bias": "fc_proj_b",
}
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")  # causal-mask buffers of older files
EXIT_HEAD_NAME = "name_to_lm_exit_head.lm_head_{}.weight"


def resolve_dtype(dtype, device: torch.device | None = None) -> torch.dtype:
    """A dtype name or torch dtype; None: the default of every entry point, fp16 on CUDA and fp32 elsewhere."""
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


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for every tensor mexit needs (`lm_head.weight` only when untied)."""
    d, v, inner = config.n_embd, config.vocab_size, config.inner_dim
    per_block = {
        "ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (inner, d),
        "mlp.c_proj.bias": (d,),
    }
    shapes = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (config.n_positions, d),
              "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{k}": s for k, s in per_block.items()})
    shapes.update({EXIT_HEAD_NAME.format(layer): (v, d) for layer in config.exit_layers})
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def check_finite(state: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite values, naming every tensor that holds them (one reduction per tensor)."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"non-finite values (NaN or inf) in {len(bad)} tensor(s): {', '.join(sorted(bad)[:8])}"
                         f"{' ...' if len(bad) > 8 else ''}; the checkpoint is corrupted (check_weights=False / "
                         "--no-weight-check loads it anyway)")


def weights_from_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> Weights:
    """Validate names and shapes against `config` and stack per-layer tensors. Raises naming every problem."""
    shapes = expected_shapes(config)
    optional = {"lm_head.weight": (config.vocab_size, config.n_embd)}
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(k for k in state if k not in shapes and k not in optional
                        and not k.endswith(_IGNORED_SUFFIXES))
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {s})" for k, s in {**shapes, **optional}.items()
             if k in state and tuple(state[k].shape) != s]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (not in config.json's shape or exits): {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong)}")
    if problems:
        raise ValueError("checkpoint does not match its config:\n  " + "\n  ".join(problems))

    def stack(suffix):
        return torch.stack([state[f"transformer.h.{i}.{suffix}"] for i in range(config.n_layer)])

    return Weights(
        wte=state["transformer.wte.weight"], wpe=state["transformer.wpe.weight"],
        **{field: stack(suffix) for suffix, field in _BLOCK_TENSORS.items()},
        ln_f_w=state["transformer.ln_f.weight"], ln_f_b=state["transformer.ln_f.bias"],
        exit_heads={layer: state[EXIT_HEAD_NAME.format(layer)] for layer in config.exit_layers},
        lm_head=None if config.tie_word_embeddings else state["lm_head.weight"],
    )


def state_dict_from_weights(weights: Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {"transformer.wte.weight": weights.wte, "transformer.wpe.weight": weights.wpe,
             "transformer.ln_f.weight": weights.ln_f_w, "transformer.ln_f.bias": weights.ln_f_b}
    for suffix, field in _BLOCK_TENSORS.items():
        stacked = getattr(weights, field)
        state.update({f"transformer.h.{i}.{suffix}": stacked[i] for i in range(config.n_layer)})
    state.update({EXIT_HEAD_NAME.format(layer): w for layer, w in weights.exit_heads.items()})
    if weights.lm_head is not None:
        state["lm_head.weight"] = weights.lm_head
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def random_weights(config: ModelConfig, seed: int = 0, std: float = 0.02, device="cpu", dtype=torch.float32) -> Weights:
    """GPT-2-style random init (normal(0, std) matrices and biases, unit layernorms), drawn on `device` (the
    values depend on the device's generator), stored in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            state[name] = torch.ones(shape, device=device, dtype=dtype)
        else:  # nonzero biases too, so that every bias path is exercised
            state[name] = (torch.randn(shape, generator=gen, device=device) * std).to(dtype)
    return weights_from_state_dict(state, config)


def random_model(config: ModelConfig, seed: int = 0, dtype=None, device="cpu") -> MultiExitGPT2:
    """A RANDOM-WEIGHT model of `config`'s shape: for tests and latency benchmarks only, never for quality.
    dtype None: fp16 on CUDA, fp32 elsewhere."""
    device = resolve_device(device)
    weights = random_weights(config, seed, device=device, dtype=resolve_dtype(dtype, device))
    return MultiExitGPT2(config, weights, random_weights=True)


def save_checkpoint(model: MultiExitGPT2, folder: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` in transformers' GPT-2 layout plus the exit heads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_hf().save_pretrained(folder)
    save_file(state_dict_from_weights(model.w, model.config), folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def named_weights(weights: Weights):
    """(name, tensor) of every loaded tensor; per-layer tensors are stacked, named transformer.h.*.<suffix>."""
    yield "transformer.wte.weight", weights.wte
    yield "transformer.wpe.weight", weights.wpe
    for suffix, field in _BLOCK_TENSORS.items():
        yield f"transformer.h.*.{suffix}", getattr(weights, field)
    for layer, w in weights.exit_heads.items():
        yield EXIT_HEAD_NAME.format(layer), w
    if weights.lm_head is not None:
        yield "lm_head.weight", weights.lm_head


def resolve_folder(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id downloaded through huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    if str(path_or_id).startswith((".", "/", "~")) or os.sep + os.sep in str(path_or_id):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=[
            "*.json", "*.safetensors", "pytorch_model.bin", "*.txt", "*.model"]))
    except Exception as err:  # hub unreachable, unknown id, gated repo...
        raise FileNotFoundError(
            f"{path_or_id!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Offline, download the checkpoint elsewhere and pass its local folder."
        ) from err


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupted file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # bad header, short file, bad offsets
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted: {reason})") from None


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """`pytorch_model.bin` with weights_only=True: a file holding other objects is refused without running it."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f" (it asks for {found.group(1)})" if found else ""
        raise ValueError(f"refused to load {path}: it holds pickled objects other than tensors{detail}, and mexit "
                         "never runs a checkpoint's code; convert it to safetensors with a tool you trust") from None
    except (RuntimeError, OSError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted: {reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """safetensors (single or sharded) preferred; `pytorch_model.bin` loaded with weights_only=True."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err})") from None
        state = {}
        for shard in shards:
            if not (folder / shard).exists():
                raise FileNotFoundError(f"shard {shard} listed in {index.name} is missing from {folder}")
            state.update(read_safetensors(folder / shard))
        return state
    binary = folder / "pytorch_model.bin"
    if binary.exists():
        return read_pickle(binary)
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, a sharded "
                            "model.safetensors.index.json, or pytorch_model.bin")


def read_config(folder: Path) -> ModelConfig:
    """config.json as a ModelConfig; invalid JSON or fields are a ValueError naming the file."""
    from transformers import GPT2Config

    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    try:
        return ModelConfig.from_hf(GPT2Config.from_pretrained(folder))
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: {err}") from None


def load(path_or_id: str | os.PathLike, dtype=None, device=None, check_weights: bool = True) -> MultiExitGPT2:
    """Load a plain or multi-exit GPT-2 checkpoint (folder or hub id) onto `device` (None: cuda when available) in
    `dtype` (None: fp16 on CUDA, fp32 elsewhere). check_weights: refuse tensors holding NaN or inf (one reduction
    per tensor), naming them."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = resolve_folder(path_or_id)
    config = read_config(folder)
    state = read_state_dict(folder)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "transformer.wte.weight" not in state and "wte.weight" in state:  # bare GPT2Model files
        state = {("transformer." + k if not k.startswith(("lm_head", "name_to_lm_exit_head")) else k): v
                 for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: transformers uses wte whatever the file holds
    if check_weights:
        check_finite(state)
    weights = weights_from_state_dict(state, config).to(device=device, dtype=dtype)
    if check_weights and dtype != torch.float32:  # values beyond the half-precision range turn into inf
        check_finite({f"{name} (in {str(dtype).removeprefix('torch.')})": t for name, t in named_weights(weights)})
    return MultiExitGPT2(config, weights, folder=folder)
