"""Load multi-exit GPT-2 checkpoints (transformers' on-disk layouts) into stacked weights, and build random-weight
models."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from .config import ModelConfig
from .decoder import MultiExitGPT2, Weights
from .files import StoredTensor, hub_patterns, open_tensors, shard_names
from .placement import DTYPES, resolve_device, resolve_dtype
from .predictors import ExitPredictors, load_predictors
from .token_counts import load_token_counts

# checkpoint name suffix (after "transformer.h.{i}.") -> Weights field (stacked over layers)
_BLOCK_TENSORS = {
    "ln_1.weight": "ln_1_w", "ln_1.bias": "ln_1_b",
    "attn.c_attn.weight": "attn_w", "attn.c_attn.bias": "attn_b",
    "attn.c_proj.weight": "attn_proj_w", "attn.c_proj.bias": "attn_proj_b",
    "ln_2.weight": "ln_2_w", "ln_2.bias": "ln_2_b",
    "mlp.c_fc.weight": "fc_w", "mlp.c_fc.bias": "fc_b",
    "mlp.c_proj.weight": "fc_proj_w", "mlp.c_proj.bias": "fc_proj_b",
}
# the block matrices are stored [N, K] (nn.Linear's layout: each output's weights contiguous, what the decode
# kernels stream), the transpose of the checkpoint's Conv1D [K, N]; a checkpoint name is a transposed view of them
_TRANSPOSED = ("attn_w", "attn_proj_w", "fc_w", "fc_proj_w")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older files
EXIT_HEAD_NAME = "name_to_lm_exit_head.lm_head_{}.weight"


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


def canonical(stored: dict[str, StoredTensor], config: ModelConfig) -> tuple[dict[str, StoredTensor], ModelConfig]:
    """transformers' GPT2LMHeadModel names: `module.` (DataParallel) dropped, bare GPT2Model names prefixed with
    `transformer.`; with tied embeddings a matrix stored once as `lm_head.weight` is the embedding (transformers
    loads such files), and one stored twice is read once, from `transformer.wte.weight`. A stored `lm_head.weight`
    whose values differ from the embedding's while config.json says tied (a fine-tune saved untied) is kept as the
    head, untied, as transformers 5 loads it, with one warning. Returns (tensors, the config they follow)."""
    stored = {k.removeprefix("module."): v for k, v in stored.items()}
    if "transformer.wte.weight" not in stored and "wte.weight" in stored:  # bare GPT2Model files
        stored = {("transformer." + k if not k.startswith(("lm_head", "name_to_lm_exit_head")) else k): v
                  for k, v in stored.items()}
    if config.tie_word_embeddings and "lm_head.weight" in stored:
        head, wte = stored["lm_head.weight"], stored.get("transformer.wte.weight")
        if wte is not None and head.shape == wte.shape and not torch.equal(head.read().float(), wte.read().float()):
            warnings.warn(f"config.json says tie_word_embeddings=true, but the stored lm_head.weight differs from "
                          f"transformer.wte.weight ({head.file.name}): the stored head is used, untied, as "
                          "transformers loads it; set tie_word_embeddings to false in config.json to silence this",
                          stacklevel=3)
            return stored, dataclasses.replace(config, tie_word_embeddings=False)
        stored.pop("lm_head.weight")
        stored.setdefault("transformer.wte.weight", head)
    return stored, config


def check_layout(stored: dict[str, StoredTensor], config: ModelConfig) -> None:
    """Names, shapes and dtypes against `config`, before any tensor is read. Raises naming every problem."""
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(stored))
    unexpected = sorted(k for k in stored if k not in shapes and not k.endswith(_IGNORED_SUFFIXES))
    wrong = [f"{k}: {tuple(s.shape)} (expected {tuple(shapes[k])})" for k, s in stored.items()
             if k in shapes and s.shape != shapes[k]]
    not_float = [f"{k} ({s.dtype})" for k, s in stored.items() if k in shapes and not s.dtype.is_floating_point]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (not in config.json's shape or exits): {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {', '.join(wrong)}")
    if not_float:
        problems.append(f"not floating-point: {', '.join(not_float)}")
    if problems:
        raise ValueError("checkpoint does not match its config: " + "; ".join(problems))


_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to back a large CPU tensor not yet written with 2 MB pages (madvise MADV_HUGEPAGE; transparent huge
    pages are in `madvise` mode on most distributions). Writing a few GB of fresh memory then costs one fault per
    2 MB instead of per 4 KB: 2-3x less CPU time for a load on a 2-core VM (bench/load_checkpoint.py). A hint only:
    elsewhere, or when refused, nothing happens."""
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start:
        return
    _libc().madvise(start, end - start, _MADV_HUGEPAGE)


@functools.cache
def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _stored_shape(field: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if field in _TRANSPOSED else shape


def empty_weights(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> Weights:
    """Uninitialized weights of `config`'s shape: the buffers a load writes into (pages are touched as written,
    huge pages asked for on the CPU)."""
    shapes = expected_shapes(config)

    def empty(*shape):
        tensor = torch.empty(shape, dtype=dtype, device=device)
        advise_huge_pages(tensor)
        return tensor

    return Weights(
        wte=empty(*shapes["transformer.wte.weight"]), wpe=empty(*shapes["transformer.wpe.weight"]),
        **{field: empty(config.n_layer, *_stored_shape(field, shapes[f"transformer.h.0.{suffix}"]))
           for suffix, field in _BLOCK_TENSORS.items()},
        ln_f_w=empty(config.n_embd), ln_f_b=empty(config.n_embd),
        exit_heads={layer: empty(config.vocab_size, config.n_embd) for layer in config.exit_layers},
        lm_head=None if config.tie_word_embeddings else empty(config.vocab_size, config.n_embd),
    )


# checkpoint name -> Weights field of the unstacked tensors (exit heads aside)
_WHOLE_FIELDS = {"transformer.wte.weight": "wte", "transformer.wpe.weight": "wpe", "transformer.ln_f.weight": "ln_f_w",
                 "transformer.ln_f.bias": "ln_f_b", "lm_head.weight": "lm_head"}


def checkpoint_tensors(weights: Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Checkpoint name -> the tensor of `weights` it is, in the checkpoint's shape: per-layer names are views of the
    stacked buffers (the block matrices transposed views: loading copies into them, saving makes them contiguous)."""
    named = {name: getattr(weights, field) for name, field in _WHOLE_FIELDS.items()
             if getattr(weights, field) is not None}  # lm_head: None when tied
    for suffix, field in _BLOCK_TENSORS.items():
        stacked = getattr(weights, field)
        named.update({f"transformer.h.{i}.{suffix}": stacked[i].T if field in _TRANSPOSED else stacked[i]
                      for i in range(config.n_layer)})
    named.update({EXIT_HEAD_NAME.format(layer): w for layer, w in weights.exit_heads.items()})
    return named


class Staging:
    """Host-to-GPU copies through one reusable pinned buffer: the cast happens on the host, into the buffer, so the
    bus carries the target dtype and host memory holds one tensor at a time."""

    def __init__(self, nbytes: int):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        stage = self.buffer[: dst.numel() * dst.element_size()].view(dst.dtype).view(dst.shape)
        stage.copy_(src)
        dst.copy_(stage, non_blocking=True)
        torch.cuda.current_stream(dst.device).synchronize()  # the buffer is reused by the next tensor


def range_problem(name: str, dst: torch.Tensor, src: torch.Tensor) -> str | None:
    """One pass over the cast tensor: NaN propagates through aminmax, a value beyond the target dtype's range became
    inf. Only a failing tensor reads its source again, to say which of the two happened."""
    if dst.numel() == 0:
        return None
    low, high = torch.aminmax(dst)
    if math.isfinite(low.item()) and math.isfinite(high.item()):
        return None
    if not bool(torch.isfinite(src).all()):
        return f"{name} holds non-finite values (NaN or inf)"
    dtype = str(dst.dtype).removeprefix("torch.")
    return (f"{name} holds values up to {src.abs().max().item():.4g}, beyond {dtype}'s range "
            f"(+-{torch.finfo(dst.dtype).max:.4g})")


def adoptable(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether a stored tensor can be the weight itself instead of being copied: no cast, no move, and laid out as
    the buffer it replaces (contiguous, 8-byte aligned: what safetensors writers guarantee for memory mapping; torch
    zip records are 64-byte aligned)."""
    return (dst.device.type == "cpu" and src.dtype == dst.dtype and src.shape == dst.shape and src.is_contiguous()
            and src.data_ptr() % 8 == 0)


def adopt(weights: Weights, name: str, tensor: torch.Tensor, config: ModelConfig) -> None:
    """Make `tensor` the unstacked weight `name` of `weights` in place of its buffer."""
    exits = {EXIT_HEAD_NAME.format(layer): layer for layer in config.exit_layers}
    if name in exits:
        weights.exit_heads[exits[name]] = tensor
    else:
        setattr(weights, _WHOLE_FIELDS[name], tensor)


def fill(weights: Weights, stored: dict[str, StoredTensor], config: ModelConfig, check: bool = True,
         desc: str = "loading") -> None:
    """Copy every stored tensor, in file order, straight into its place in `weights`, cast once to their dtype;
    each entry is dropped from `stored` once read (releasing it). An unstacked tensor (embeddings, heads) that needs
    no cast on the CPU is used as it is read instead (`adoptable`): from a memory-mapped file its weights are the
    file's pages, shared with the page cache, as transformers does. check: one range pass per tensor; every tensor
    holding NaN or inf, or values beyond the target dtype's range, is named in one ValueError. A progress bar
    shows on a terminal for loads over 1 GB."""
    from tqdm import tqdm

    targets = checkpoint_tensors(weights, config)
    unstacked = set(_WHOLE_FIELDS) | {EXIT_HEAD_NAME.format(layer) for layer in config.exit_layers}
    staging = None
    if weights.wte.device.type == "cuda":
        staging = Staging(max(t.numel() * t.element_size() for t in targets.values()))
    total = sum(stored[name].nbytes for name in targets)
    problems = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if total > 1e9 else True,
              leave=False) as bar:
        for name in list(stored):
            entry = stored.pop(name)
            if name not in targets:  # causal-mask buffers of older files
                continue
            src, dst = entry.read(), targets[name]
            if name in unstacked and adoptable(src, dst):
                adopt(weights, name, src, config)
                dst = src
            elif staging is not None:
                staging.copy(dst, src)
            else:
                dst.copy_(src)
            if check and (problem := range_problem(name, dst, src)):
                problems.append(problem)
            bar.update(entry.nbytes)
            del src, dst, entry
    if problems:
        raise ValueError(f"{len(problems)} tensor(s) cannot be loaded: {'; '.join(problems[:8])}"
                         f"{' ...' if len(problems) > 8 else ''} (check_weights=False / --no-weight-check loads "
                         "them anyway)")


def state_dict_from_weights(weights: Weights, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Checkpoint name -> contiguous CPU tensor (views of the stacked buffers where the weights are on the CPU)."""
    return {k: v.detach().contiguous().cpu() for k, v in checkpoint_tensors(weights, config).items()}


def random_weights(config: ModelConfig, seed: int = 0, std: float = 0.02, device="cpu", dtype=torch.float32) -> Weights:
    """GPT-2-style random init (normal(0, std) matrices and biases, unit layernorms), drawn on `device` (the
    values depend on the device's generator), stored in `dtype`."""
    device = resolve_device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = empty_weights(config, dtype, device)
    targets = checkpoint_tensors(weights, config)
    for name, shape in expected_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            targets[name].fill_(1.0)
        else:  # nonzero biases too, so that every bias path is exercised
            targets[name].copy_(torch.randn(shape, generator=gen, device=device) * std)
    return weights


RANDOM_KEY = "mexit_random_weights"  # config.json: true where the weights are random_model's (saved)


def random_model(config: ModelConfig, seed: int = 0, dtype=None, device="cpu") -> MultiExitGPT2:
    """A RANDOM-WEIGHT model of `config`'s shape: for tests and latency benchmarks only, never for quality.
    dtype None: fp16 on CUDA, fp32 elsewhere. It carries random learned exit predictors (every exit below the
    last layer) and random token counts, so that every mode runs on it."""
    device = resolve_device(device)
    weights = random_weights(config, seed, device=device, dtype=resolve_dtype(dtype, device))
    model = MultiExitGPT2(config, weights, random_weights=True)
    gen = torch.Generator().manual_seed(seed)
    exits = tuple(x for x in config.exit_layers if x < config.n_layer)
    if exits:
        d = config.n_embd
        model.predictors = ExitPredictors(exits, torch.randn(len(exits), d, generator=gen) / d ** 0.5,
                                          torch.zeros(len(exits)), config.layer_norm_epsilon).to(device)
    model.token_counts = torch.randint(0, 1000, (config.vocab_size,), generator=gen)
    return model


def named_weights(weights: Weights):
    """(name, tensor) of every loaded tensor; per-layer tensors are stacked, named transformer.h.*.<suffix> (the
    block matrices [L, N, K], the transpose of the checkpoint's Conv1D layout)."""
    yield "transformer.wte.weight", weights.wte
    yield "transformer.wpe.weight", weights.wpe
    for suffix, field in _BLOCK_TENSORS.items():
        yield f"transformer.h.*.{suffix}", getattr(weights, field)
    for layer, w in weights.exit_heads.items():
        yield EXIT_HEAD_NAME.format(layer), w
    if weights.lm_head is not None:
        yield "lm_head.weight", weights.lm_head


HUB_TIMEOUT_S = 10  # seconds the hub has to answer what a repository holds


@dataclasses.dataclass(frozen=True)
class HubOptions:
    """huggingface_hub's loading arguments, as transformers' from_pretrained takes them. revision: a branch, tag or
    commit of a hub repository; token: an access token (None: huggingface_hub's login / HF_TOKEN); cache_dir: the hub
    cache folder (None: huggingface_hub's, HF_HOME); local_files_only: never ask the hub, use the cache; subfolder:
    where in the folder or repository the checkpoint lies."""

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    subfolder: str = ""

    def __post_init__(self):
        for name in ("revision", "subfolder"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
        if not isinstance(self.local_files_only, bool):
            raise ValueError(f"local_files_only must be True or False, got {self.local_files_only!r}")
        if self.subfolder and (Path(self.subfolder).is_absolute() or ".." in Path(self.subfolder).parts):
            raise ValueError(f"subfolder must be a relative path inside the checkpoint, got {self.subfolder!r}")

    def download(self, repo: str, patterns: list[str] | None = None) -> Path:
        """snapshot_download with these options (the patterns inside `subfolder`); the folder of the checkpoint."""
        from huggingface_hub import snapshot_download

        sub = self.subfolder.strip("/")
        if patterns is not None and sub:
            patterns = [f"{sub}/{p}" for p in patterns]
        folder = Path(snapshot_download(repo, revision=self.revision, cache_dir=self.cache_dir, token=self.token,
                                        local_files_only=self.local_files_only, allow_patterns=patterns))
        return folder / sub if sub else folder


def local_folder(path_or_id: str | os.PathLike) -> Path | None:
    """`path_or_id` as a local folder, or None where it names a hub id; without asking the hub. Errors: ValueError
    for a file, FileNotFoundError for a local path that does not exist (one starting with ".", "/" or "~", or one
    whose parent folder exists: "bench/small_modl" is a mistyped folder, not a hub id)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    if str(path_or_id).startswith((".", "/", "~")) or os.sep + os.sep in str(path_or_id):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if len(path.parts) > 1 and path.parent.is_dir():
        near = sorted(p.name for p in path.parent.iterdir() if p.is_dir() and (p / "config.json").exists())
        raise FileNotFoundError(f"checkpoint folder {path} does not exist (its parent {path.parent} is a local "
                                f"folder{'; checkpoints there: ' + ', '.join(near[:8]) if near else ''}); a hub id "
                                "is tried only when no local folder of that name's first part exists")
    return None


def resolve_folder(path_or_id: str | os.PathLike, hub: HubOptions | None = None) -> Path:
    """A local folder as is (its `hub.subfolder` inside it); otherwise a hub id through huggingface_hub with `hub`'s
    options: its metadata and the weights of one layout (`files.hub_patterns`). Errors: FileNotFoundError naming the
    folder, the repository, the revision or the cache that lacks it; ValueError for a revision asked of a local
    folder (it has none: pass the hub id)."""
    hub = hub or HubOptions()
    path = local_folder(path_or_id)
    if path is not None:
        if hub.revision is not None:
            raise ValueError(f"revision={hub.revision!r}: {path} is a local folder, which has no revisions (pass the "
                             "hub id to load a revision, or leave revision out)")
        if hub.token is not None or hub.cache_dir is not None:
            warnings.warn(f"{path} is a local folder: token and cache_dir apply to hub ids only and are not used",
                          stacklevel=3)
        folder = path / hub.subfolder if hub.subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"subfolder {hub.subfolder!r} does not exist in {path}")
        return folder
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    repo = str(path_or_id)
    at = f" at revision {hub.revision!r}" if hub.revision is not None else ""
    if hub.local_files_only:
        return cached_snapshot(repo, hub, at, "local_files_only=True")
    try:
        # one request, not retried (list_repo_files retries a failed connection for about 25 s): offline, the
        # cache answers at once
        info = model_info(repo, revision=hub.revision, token=hub.token, timeout=HUB_TIMEOUT_S)
        repo_files = [sibling.rfilename for sibling in info.siblings or []]
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo!r} has no revision {hub.revision!r} on the Hugging Face hub") from None
    except HfHubHTTPError as err:  # the hub answered: unknown or gated repository, no access
        raise FileNotFoundError(f"{repo!r} is not a local folder, and the Hugging Face hub refused it "
                                f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    except Exception as err:  # no answer (offline, no network): a snapshot downloaded earlier, if any
        return cached_snapshot(repo, hub, at, f"the Hugging Face hub could not be reached ({type(err).__name__}: "
                                              f"{str(err).splitlines()[0] if str(err) else ''})")
    sub = hub.subfolder.strip("/")
    if sub:
        repo_files = [f.removeprefix(f"{sub}/") for f in repo_files if f.startswith(f"{sub}/")]
        if not repo_files:
            raise FileNotFoundError(f"{repo!r}{at} has no subfolder {sub!r}")
    try:
        patterns = hub_patterns(repo_files)
        folder = hub.download(repo, patterns)
        index = next((folder / name for name in patterns if name.endswith(".index.json")), None)
        if index is not None and index.is_file():  # the shards, as the index names them
            folder = hub.download(repo, shard_names(index))
        return folder
    except (HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(f"{repo!r}: downloading from the Hugging Face hub failed ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''})") from None


def cached_snapshot(repo: str, hub: HubOptions, at: str, why: str) -> Path:
    """The snapshot of `repo` (at hub.revision) in the hub cache, without asking the hub; FileNotFoundError naming
    the revision and the cache when it is not there."""
    from huggingface_hub import constants

    try:
        folder = dataclasses.replace(hub, local_files_only=True).download(repo)
    except Exception:
        cache = hub.cache_dir if hub.cache_dir is not None else constants.HF_HUB_CACHE
        raise FileNotFoundError(f"{repo!r}{at} is not in the hub cache {cache} and {why}: download it there first "
                                "(or pass its local folder)") from None
    if not folder.is_dir():
        raise FileNotFoundError(f"{repo!r}{at} in the hub cache has no subfolder {hub.subfolder!r}")
    return folder


def stored_state(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors of `folder` that `config` uses, as stored (memory-mapped where the file allows; not cast)."""
    stored, config = canonical(open_tensors(folder), config)
    check_layout(stored, config)
    return {name: stored[name].read() for name in expected_shapes(config)}


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
    from huggingface_hub.errors import StrictDataclassError  # transformers' typed config fields

    try:
        return ModelConfig.from_hf(GPT2Config.from_pretrained(folder))
    except (TypeError, ValueError, KeyError, AttributeError, StrictDataclassError) as err:
        raise ValueError(f"{path}: {' '.join(str(err).split())}") from None


def stored_random(folder: Path) -> bool:
    """Whether config.json labels the weights random (`RANDOM_KEY`: a saved `random_model`)."""
    return json.loads((folder / "config.json").read_text()).get(RANDOM_KEY) is True


def load(path_or_id: str | os.PathLike, dtype=None, device=None, check_weights: bool = True,
         hub: HubOptions | None = None) -> MultiExitGPT2:
    """Load a plain or multi-exit GPT-2 checkpoint (folder or hub id, any layout of `mexit.model.files`; `hub`:
    revision, token, cache, subfolder) onto `device` (None: cuda when available) in `dtype` (None: fp16 on CUDA, fp32
    elsewhere; "auto": the stored dtype).

    Names, shapes and dtypes are checked before any tensor is read; then each tensor is read once (memory-mapped
    where the file allows), cast straight into its place in the stacked weights (on CUDA through one pinned
    buffer) and released. check_weights: one range pass per tensor refuses NaN, inf and values beyond `dtype`'s
    range, naming the tensors. Peak memory is about the loaded weights plus one tensor (legacy non-zip `.bin`
    files are read whole first). On the CPU, embeddings and heads stored in `dtype` are the file's own pages
    (private mapping: writes stay in memory), as in transformers: replace a loaded checkpoint's files with new
    ones (as `convert` and `save_pretrained` do), never truncate them in place."""
    device = resolve_device(device)
    auto = isinstance(dtype, str) and dtype.lower() == "auto"
    try:
        dtype = None if auto else resolve_dtype(dtype, device)
    except ValueError as err:
        raise ValueError(f"{err}, or auto (the stored dtype)") from None
    folder = resolve_folder(path_or_id, hub)
    config = read_config(folder)
    stored, config = canonical(open_tensors(folder), config)
    check_layout(stored, config)
    if auto:
        stored_dtype = stored["transformer.wte.weight"].dtype
        if stored_dtype not in DTYPES.values():
            raise ValueError(f"dtype 'auto': {folder} stores {str(stored_dtype).removeprefix('torch.')}, which mexit "
                             "does not compute in; pass dtype fp32, fp16 or bf16")
        dtype = stored_dtype
    weights = empty_weights(config, dtype, device)
    fill(weights, stored, config, check_weights, desc=f"loading {folder.name}")
    model = MultiExitGPT2(config, weights, folder=folder, random_weights=stored_random(folder))
    model.predictors = load_predictors(folder, config.n_embd, config.exit_layers, device)
    model.token_counts = load_token_counts(folder, config.vocab_size)
    return model
