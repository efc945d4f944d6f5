"""`MultiExitLM`: a loaded model + its tokenizer + `generate`, the object users hold."""

from __future__ import annotations

import os
import warnings

import torch

from .checkpoint import load as load_model
from .checkpoint import random_model
from .config import DecodeConfig, ModelConfig, MultiExitConfiguration
from .generation import GenerationResult, generate_tokens
from .heads import resolve_backend
from .model import MultiExitGPT2
from .sampling import SamplingConfig
from .static_engine import generate_static
from .static_state import resolve_engine

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
    """A multi-exit GPT-2 ready to generate. Build with `MultiExitLM.from_pretrained` or `MultiExitLM.random`."""

    def __init__(self, model: MultiExitGPT2, tokenizer=None, backend: str = "auto", engine: str = "auto",
                 compile: bool = False, pdl: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.requested_backend, self.requested_engine = backend, engine
        self.backend = resolve_backend(backend, model.device)
        self.engine = resolve_engine(engine, model.device)
        self.compile = compile  # torch.compile the layers of static steps (static / graph engines)
        self._static_steps: dict = {}  # StepKey -> StaticStep (captured CUDA graphs), reused across calls
        self.pdl = pdl and self.pdl_available()  # programmatic dependent launch in the static steps' kernels
        if pdl and not self.pdl:
            warnings.warn("pdl=True needs the triton backend, a static engine and a CUDA GPU of compute capability "
                          "9.0 or newer: running without programmatic dependent launch", stacklevel=2)

    def pdl_available(self) -> bool:
        """Whether the static steps' kernels can launch with programmatic dependent launch here."""
        from mexit.kernels.launch import pdl_supported

        return self.backend == "triton" and self.engine != "eager" and pdl_supported(self.model.device)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype="fp32", device=None, backend: str = "auto",
                        engine: str = "auto", compile: bool = False, check_weights: bool = True,
                        pdl: bool = False) -> MultiExitLM:
        model = load_model(path_or_id, dtype=dtype, device=device, check_weights=check_weights)
        return cls(model, load_tokenizer(model.folder), backend=backend, engine=engine, compile=compile, pdl=pdl)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype="fp32", device="cpu", backend="auto",
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
                 early_exit=None, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | list[int] | None = None, eos_token_id: int | None | str = "config",
                 return_cache: bool = False, on_token=None, keep_logits: bool = False, speculative=None,
                 **acd_names) -> GenerationResult:
        """Generate `max_new_tokens` per prompt (text, a list of texts, token ids, or a list of id lists).

        Modes: original head (default), `exit_layer=L`, `contrast=(upper, lower)` (ACD; upper may be
        "original"), autocontrastive-gen's `use_original_head`/`output_layer_index`/`contrast_layer_indices` or
        `multi_exit_config`, or a ready `decode=DecodeConfig(...)`.
        `early_exit=ExitPolicy(...)` runs the confidence-gated scheduler instead, and
        `speculative=SpeculativeConfig(...)` decodes the chosen mode self-speculatively (the same greedy tokens, the
        same sampling distribution; eager engine). eos_token_id: "config" uses the checkpoint's, None never stops
        early. seed: one for every row or one per row; each row samples from
        its own random stream, so a row gets the same tokens alone and in any batch. return_cache keeps the final
        KV cache on the result, keep_logits every step's [B, V] logits of the mode (both: eager engine, fixed
        modes). on_token(tokens [B]) receives every step's tokens (streaming; speculative: row 0's, as emitted)."""
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        eos = self.config.eos_token_id if eos_token_id == "config" else eos_token_id
        ids = self.encode(prompts)
        if early_exit is not None:
            if mode is not None or exit_layer is not None or contrast is not None or acd_names or decode:
                raise ValueError("early_exit chooses its own heads: do not combine it with a decoding mode")
        elif decode is None:
            decode = decode_config(mode, exit_layer, contrast, alpha, min_candidates, multi_exit_config, **acd_names)
        if keep_logits and (early_exit is not None or speculative is not None):
            raise NotImplementedError("keep_logits with early exit or speculative decoding: the logits are not "
                                      "those of one fixed pass per token")
        if speculative is not None:
            if early_exit is not None:
                raise ValueError("speculative decoding verifies a fixed mode: do not combine it with early_exit")
            from .speculative import generate_speculative

            if self.engine != "eager":
                warnings.warn(f"speculative decoding runs on the eager engine (not implemented on the {self.engine} "
                              "engine yet)", stacklevel=2)
            result = generate_speculative(self.model, ids, speculative, decode, max_new_tokens, sampling, eos,
                                          self.backend, return_cache, on_token)
            if self.tokenizer is not None:
                result.text = [self.tokenizer.decode(row) for row in result.tokens]
            return result
        if self.engine != "eager" and not (return_cache or keep_logits):  # the static step (CUDA graphs on "graph")
            result = generate_static(self._static_steps, self.model, ids, early_exit or decode, max_new_tokens,
                                     sampling, eos, self.backend, self.engine, on_token, self.compile, self.pdl)
        elif early_exit is not None:
            from .early_exit import generate_early_exit

            result = generate_early_exit(self.model, ids, early_exit, max_new_tokens, sampling, eos, self.backend,
                                         return_cache, on_token)
        else:
            result = generate_tokens(self.model, ids, decode, max_new_tokens, sampling, eos, self.backend,
                                     return_cache, on_token, keep_logits)
        if self.tokenizer is not None:
            result.text = [self.tokenizer.decode(row) for row in result.tokens]
        return result
