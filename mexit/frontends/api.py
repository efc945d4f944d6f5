"""`MultiExitLM`: a loaded model + its tokenizer + `generate`, the object users hold."""

from __future__ import annotations

import dataclasses
import os

import torch

from mexit.decoding.early_exit import ExitPolicy
from mexit.decoding.fixed import DecodeConfig, MultiExitConfiguration
from mexit.decoding.sampling import SamplingConfig
from mexit.decoding.speculative import Speculation, SpeculativeConfig
from mexit.generate import GenerationResult, generate, new_engine, resolve_engine
from mexit.model.checkpoint import load as load_model
from mexit.model.checkpoint import random_model
from mexit.model.config import ModelConfig
from mexit.model.decoder import MultiExitGPT2
from mexit.ops import Backend
from mexit.ops.backend import resolve_backend

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def load_tokenizer(folder):
    """transformers' AutoTokenizer from the checkpoint folder, or None when the folder has no tokenizer files."""
    if folder is None or not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def decode_config(mode=None, exit_layer=None, contrast=None, alpha=0.1, min_candidates=1,
                  multi_exit_config: MultiExitConfiguration | None = None, **acd_names) -> DecodeConfig:
    """Build a DecodeConfig from mexit's names (mode/exit_layer/contrast) or autocontrastive-gen's
    (use_original_head / output_layer_index / contrast_layer_indices, or a whole MultiExitConfiguration)."""
    unknown = set(acd_names) - {"use_original_head", "output_layer_index", "contrast_layer_indices"}
    if unknown:
        raise TypeError(f"unexpected arguments: {sorted(unknown)}")
    if acd_names:
        if multi_exit_config is not None or mode is not None:
            raise ValueError("pass either mode=... or autocontrastive-gen's names, not both")
        acd_names.setdefault("use_original_head", False)
        multi_exit_config = MultiExitConfiguration(alpha=alpha, minimum_candidates=min_candidates, **acd_names)
    if multi_exit_config is not None:
        return multi_exit_config.to_decode_config()
    mode = mode or ("exit" if exit_layer is not None else "contrast" if contrast is not None else "original")
    upper, lower = contrast if contrast is not None else (None, None)
    return DecodeConfig(mode, exit_layer=exit_layer, upper=upper, lower=lower, alpha=alpha,
                        min_candidates=min_candidates)


class MultiExitLM:
    """A multi-exit GPT-2 ready to generate. Build with `MultiExitLM.from_pretrained` or `MultiExitLM.random`.

    backend: "auto" / "torch" / "triton" (or a ready `mexit.ops.Backend`); engine: "auto" / "eager" / "static" /
    "graph" (the engine object keeps built static steps between calls); compile: torch.compile the static steps'
    layers (torch backend); pdl: programmatic dependent launch (triton, Hopper or newer); fused_max_rows: the
    largest decode batch that runs fused-linear kernels (triton)."""

    def __init__(self, model: MultiExitGPT2, tokenizer=None, backend: str | Backend = "auto", engine: str = "auto",
                 compile: bool = False, pdl: bool = False, fused_max_rows: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = dict(backend=backend, engine=engine, compile=compile, pdl=pdl, fused_max_rows=fused_max_rows)
        if isinstance(backend, Backend):
            self.backend = backend
        else:
            self.backend = resolve_backend(backend, model.device, pdl,
                                           **({} if fused_max_rows is None else dict(fused_max_rows=fused_max_rows)))
        self.compile = compile  # torch.compile the layers of static steps (static / graph engines)
        self.engine = engine

    @property
    def engine(self) -> str:
        """The engine generations run on ("eager", "static" or "graph"); setting it starts a new engine."""
        return self._engine.name

    @engine.setter
    def engine(self, name: str) -> None:
        self._engine = new_engine(resolve_engine(name, self.model.device), self.compile)

    @property
    def pdl(self) -> bool:
        return self.backend.pdl

    def with_backend(self, **changes) -> None:
        """Change backend settings in place (pdl, fused_max_rows): later calls build steps for the new settings."""
        self.backend = dataclasses.replace(self.backend, **changes)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype=None, device=None, backend: str = "auto",
                        engine: str = "auto", compile: bool = False, check_weights: bool = True,
                        pdl: bool = False) -> MultiExitLM:
        """dtype None: fp16 on CUDA, fp32 on CPU (the rule of every entry point)."""
        model = load_model(path_or_id, dtype=dtype, device=device, check_weights=check_weights)
        return cls(model, load_tokenizer(model.folder), backend=backend, engine=engine, compile=compile, pdl=pdl)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype=None, device="cpu", backend="auto",
               engine="auto", compile: bool = False, pdl: bool = False) -> MultiExitLM:
        """RANDOM weights of `config`'s shape (benchmarks, tests); `is_random` says so."""
        return cls(random_model(config, seed=seed, dtype=dtype, device=device), backend=backend, engine=engine,
                   compile=compile, pdl=pdl)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def is_random(self) -> bool:
        return self.model.random_weights

    def encode(self, prompts) -> list[list[int]]:
        """str / list[str] through the tokenizer; token ids pass through."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer files: pass token ids instead of text")
            if any(p == "" for p in prompts):
                raise ValueError("empty prompt: every row needs at least one token")
            return [self.tokenizer.encode(p) for p in prompts]
        return prompts

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int = 32, *, mode: str | None = None, exit_layer: int | None = None,
                 contrast: tuple | None = None, alpha: float = 0.1, min_candidates: int = 1,
                 multi_exit_config: MultiExitConfiguration | None = None, decode: DecodeConfig | None = None,
                 early_exit: ExitPolicy | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | list[int] | None = None,
                 eos_token_id: int | None | str = "config", return_cache: bool = False, on_token=None,
                 keep_logits: bool = False, speculative: SpeculativeConfig | None = None,
                 **acd_names) -> GenerationResult:
        """Generate `max_new_tokens` per prompt (text, a list of texts, token ids, or a list of id lists).

        Modes: original head (default), `exit_layer=L`, `contrast=(upper, lower)` (ACD; upper may be
        "original"), autocontrastive-gen's `use_original_head`/`output_layer_index`/`contrast_layer_indices` or
        `multi_exit_config`, or a ready `decode=DecodeConfig(...)`.
        `early_exit=ExitPolicy(...)` runs the confidence-gated scheduler instead, and
        `speculative=SpeculativeConfig(...)` decodes the chosen mode self-speculatively (the same greedy tokens, the
        same sampling distribution). Every mode runs on every engine. eos_token_id: "config" uses the checkpoint's,
        None never stops early. seed: one for every row or one per row; each row samples from its own random
        stream, so a row gets the same tokens alone and in any batch. return_cache keeps the real rows' final KV
        cache on the result, keep_logits every step's [B, V] logits of the mode (fixed modes). on_token(tokens [B])
        receives the tokens of every position as it completes (a device tensor)."""
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        eos = self.config.eos_token_id if eos_token_id == "config" else eos_token_id
        ids = self.encode(prompts)
        if early_exit is not None:
            if mode is not None or exit_layer is not None or contrast is not None or acd_names or decode:
                raise ValueError("early_exit chooses its own heads: do not combine it with a decoding mode")
            if speculative is not None:
                raise ValueError("speculative decoding verifies a fixed mode: do not combine it with early_exit")
            early_exit.check_engine(self.engine, self.backend.name)
            spec = early_exit
        else:
            spec = decode or decode_config(mode, exit_layer, contrast, alpha, min_candidates, multi_exit_config,
                                           **acd_names)
            if speculative is not None:
                spec = Speculation(speculative, spec)
        result = generate(self.model, ids, spec, self._engine, self.backend, max_new_tokens, sampling, eos,
                          on_token=on_token, return_cache=return_cache, keep_logits=keep_logits)
        if self.tokenizer is not None:
            result.text = [self.tokenizer.decode(row) for row in result.tokens]
        return result


def load(path_or_id, dtype=None, device=None, backend: str = "auto", engine: str = "auto", compile: bool = False,
         check_weights: bool = True, pdl: bool = False) -> MultiExitLM:
    """Load a GPT-2 or multi-exit GPT-2 checkpoint (local folder or hub id) ready to `generate`.

    dtype: fp32 / fp16 / bf16; None: fp16 on CUDA, fp32 elsewhere (the CLI and the drop-in use the same rule).
    backend: ops through "triton" kernels or the "torch" references (auto: triton on CUDA).
    engine: "graph" (CUDA graphs), "static" (the same steps without capture) or "eager" (auto: graph on CUDA).
    compile: torch.compile the static steps' layers (torch backend). check_weights: refuse tensors that hold NaN or
    inf (naming them). pdl: the kernels use programmatic dependent launch (triton backend, Hopper or newer GPU;
    off by default: measured 2.6 % slower at batch 1 on an H200, bench/RESULTS.md)."""
    return MultiExitLM.from_pretrained(path_or_id, dtype=dtype, device=device, backend=backend, engine=engine,
                                       compile=compile, check_weights=check_weights, pdl=pdl)
