"""`MultiExitLM`: a loaded model + its tokenizer + `generate`, the object users hold."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from mexit.decoding import modes
from mexit.decoding.dola import DolaConfig
from mexit.decoding.early_exit import ExitPolicy
from mexit.decoding.fixed import MultiExitConfiguration
from mexit.decoding.heads import DecodeConfig
from mexit.decoding.layers import LayerPredictions, layer_predictions
from mexit.decoding.prompts import check_prompts
from mexit.decoding.sampling import SamplingConfig
from mexit.decoding.speculative import Speculation, SpeculativeConfig
from mexit.decoding.stopping import row_verdicts
from mexit.engines.eager import EagerEngine
from mexit.engines.static import StaticEngine
from mexit.generate import GenerationResult, generate, stop_ids_in_vocabulary
from mexit.model.checkpoint import HubOptions, random_model
from mexit.model.checkpoint import load as load_model
from mexit.model.config import ModelConfig
from mexit.model.decoder import MultiExitGPT2
from mexit.model.generation_config import (
    DEFAULT_MAX_NEW_TOKENS,
    generation_defaults,
    load_tokenizer,
    read_generation_config,
)
from mexit.ops import Backend
from mexit.ops.backend import resolve_backend
from mexit.values import plain

ENGINES = ("auto", "eager", "static", "graph")


def resolve_engine(name: str, device: torch.device) -> str:
    """auto -> graph on CUDA, eager elsewhere; graph without CUDA falls back to static with a warning."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; use one of {ENGINES}")
    if name == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if name == "graph" and device.type != "cuda":
        warnings.warn("CUDA graphs need a CUDA device: running the same static step eagerly", stacklevel=3)
        return "static"
    return name


def new_engine(name: str, compile_layers: bool = False):
    """An engine by its resolved name (the static ones keep their built steps between calls)."""
    return EagerEngine() if name == "eager" else StaticEngine(graph=name == "graph", compile_layers=compile_layers)


ACD_NAMES = ("use_original_head", "output_layer_index", "contrast_layer_indices")  # autocontrastive-gen's


def decode_config(mode=None, exit_layer=None, contrast=None, alpha=0.1, min_candidates=1,
                  multi_exit_config: MultiExitConfiguration | None = None, **acd_names) -> DecodeConfig:
    """Build a DecodeConfig from mexit's names (mode/exit_layer/contrast) or autocontrastive-gen's
    (use_original_head / output_layer_index / contrast_layer_indices, or a whole MultiExitConfiguration). Names of
    two modes at once are an error."""
    unknown = set(acd_names) - set(ACD_NAMES)
    if unknown:
        raise TypeError(f"unexpected arguments: {sorted(unknown)}")
    given = [name for name, value in (("mode", mode), ("exit_layer", exit_layer), ("contrast", contrast),
                                       ("multi_exit_config", multi_exit_config)) if value is not None]
    if acd_names:
        if given:
            raise ValueError(f"pass either mexit's mode arguments ({', '.join(given)}) or autocontrastive-gen's "
                             f"names ({', '.join(sorted(acd_names))}), not both")
        acd_names.setdefault("use_original_head", False)
        multi_exit_config = MultiExitConfiguration(alpha=alpha, minimum_candidates=min_candidates, **acd_names)
    if multi_exit_config is not None:
        if len(given) > 1:
            raise ValueError(f"multi_exit_config chooses the mode: do not combine it with {given[0]}")
        return multi_exit_config.to_decode_config()
    if exit_layer is not None and contrast is not None:
        raise ValueError("exit_layer and contrast choose different modes: pass one")
    if mode == "original" and (exit_layer is not None or contrast is not None):
        raise ValueError("mode 'original' takes no exit_layer or contrast")
    mode = mode or ("exit" if exit_layer is not None else "contrast" if contrast is not None else "original")
    if contrast is not None and (isinstance(contrast, str) or not isinstance(contrast, (tuple, list))
                                 or len(contrast) != 2):
        raise ValueError(f"contrast must be a pair (upper, lower) of layers (upper may be 'original'), got "
                         f"{contrast!r}")
    upper, lower = contrast if contrast is not None else (None, None)
    return DecodeConfig(mode, exit_layer=exit_layer, upper=upper, lower=lower, alpha=alpha,
                        min_candidates=min_candidates)


def mode_settings(mode=None, exit_layer=None, contrast=None, alpha=0.1, min_candidates=1, multi_exit_config=None,
                  decode=None, early_exit=None, speculative=None, dola_layers=None, dola_heads="embedding",
                  acd_names=None, config=None):
    """The settings of `MultiExitLM.generate`'s mode arguments (an instance of one of
    `mexit.decoding.modes.settings_classes()`). mode: a mode's settings, a string of the mode mini-language
    (`modes.parse`: "exit:12", "ee:max-prob:0.9", ...), or a fixed mode's name with exit_layer / contrast /
    autocontrastive-gen's names (`decode_config`); speculative: a SpeculativeConfig verifying the fixed mode chosen.
    alpha / min_candidates set the ACD parameters of a contrast string (a settings object carries its own). config:
    the checkpoint's, to check a mode string against. Error: arguments of two modes at once."""
    acd_names = acd_names or {}
    for name, value, cls, instead in (("early_exit", early_exit, ExitPolicy, "mode='ee:max-prob:0.9'"),
                                      ("speculative", speculative, SpeculativeConfig, "mode='spec:12:2'")):
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"{name} takes {cls.__name__}(...) from {cls.__module__}, got {type(value).__name__} "
                            f"{value!r}; a mode string does it in one: {instead}")
    if decode is not None and not isinstance(decode, modes.settings_classes()):
        raise TypeError(f"decode takes a mode's settings ({', '.join(c.__name__ for c in modes.settings_classes())}), "
                        f"got {type(decode).__name__} {decode!r}; a mode string is mode='exit:12'")
    if isinstance(mode, SpeculativeConfig):
        raise ValueError("a SpeculativeConfig is how a mode is decoded, not a mode: pass speculative=SpeculativeConfig("
                         "...) beside the mode it verifies, or a mode string such as 'spec:12:2'")
    if isinstance(mode, str) and not mode.strip():
        raise ValueError("mode is empty: name a mode (original, exit:L, ...; mexit.decoding.modes) or leave it None")
    if isinstance(mode, str) and ":" not in mode and mode not in modes.NAMES + modes.SHORT_NAMES:
        modes.parse_words(mode)  # ValueError: unknown mode, naming every form
    if isinstance(mode, str) and ":" not in mode and mode in modes.NAMES + modes.SHORT_NAMES and \
            mode not in ("original", "exit", "contrast"):
        raise ValueError(f"mode {mode!r} takes its settings: write it as {modes.form(mode)} (the mode mini-language, "
                         "mexit.decoding.modes), or use its keyword arguments")
    if isinstance(mode, modes.settings_classes()) or (isinstance(mode, str) and ":" in mode):
        others = [name for name, value in (("exit_layer", exit_layer), ("contrast", contrast), ("decode", decode),
                                           ("early_exit", early_exit), ("dola_layers", dola_layers),
                                           ("multi_exit_config", multi_exit_config)) if value is not None]
        others += ["dola_heads"] if dola_heads != "embedding" else []
        if others or acd_names:
            first_other = (others or sorted(acd_names))[0]
            raise ValueError(f"mode={mode!r} chooses the mode: do not combine it with {first_other}")
        acd = (alpha, min_candidates) != (0.1, 1)
        spec = modes.parse(mode, config) if isinstance(mode, str) else mode
        if acd and not (isinstance(mode, str) and isinstance(spec, DecodeConfig) and spec.mode == "contrast"):
            raise ValueError("alpha and min_candidates apply to a contrast mode string (a DecodeConfig carries its "
                             "own)")
        if acd:
            spec = dataclasses.replace(spec, alpha=alpha, min_candidates=min_candidates)
        if speculative is not None:
            if not isinstance(spec, DecodeConfig):
                raise ValueError("speculative decoding verifies a fixed mode (original, exit or contrast)")
            spec = Speculation(speculative, spec)
        return spec
    if (alpha, min_candidates) != (0.1, 1):
        carrier = "decode=" if decode is not None else "multi_exit_config" if multi_exit_config is not None else None
        if carrier:
            raise ValueError(f"alpha and min_candidates: {carrier} carries its own; set them there")
        if (contrast is None and mode != "contrast" and "contrast_layer_indices" not in acd_names
                or early_exit is not None or dola_layers is not None):
            raise ValueError("alpha and min_candidates set ACD's contrast: pass them with contrast=(upper, lower) or "
                             "a contrast mode string; this call decodes no contrast")
    if dola_layers is not None:
        if (mode is not None or exit_layer is not None or contrast is not None or acd_names or decode
                or early_exit is not None or speculative is not None or multi_exit_config is not None):
            raise ValueError("dola_layers chooses the mode (DoLa): do not combine it with other mode arguments")
        if not isinstance(dola_layers, (str, list, tuple)):
            raise ValueError(f"dola_layers must be 'low', 'high' or a list of layers, got {dola_layers!r}")
        return DolaConfig(dola_layers, dola_heads)
    if dola_heads != "embedding":
        raise ValueError("dola_heads goes with dola_layers")
    if early_exit is not None:
        if mode is not None or exit_layer is not None or contrast is not None or acd_names or decode:
            raise ValueError("early_exit chooses its own heads: do not combine it with a decoding mode")
        if speculative is not None:
            raise ValueError("speculative decoding verifies a fixed mode: do not combine it with early_exit")
        return early_exit
    if decode is not None and (mode or exit_layer is not None or contrast is not None or acd_names
                               or multi_exit_config is not None):
        raise ValueError("decode= chooses the mode: do not combine it with other mode arguments")
    spec = decode or decode_config(mode, exit_layer, contrast, alpha, min_candidates, multi_exit_config, **acd_names)
    return spec if speculative is None else Speculation(speculative, spec)


class MultiExitLM:
    """A multi-exit GPT-2 ready to generate. Build with `MultiExitLM.from_pretrained` or `MultiExitLM.random`.

    backend: "auto" / "torch" / "triton" (or a ready `mexit.ops.Backend`); engine: "auto" / "eager" / "static" /
    "graph" (the engine object keeps built static steps between calls); compile: torch.compile the static steps'
    layers (torch backend). On triton, left None they follow the card's measurements (`mexit/ops/routes.json`):
    pdl: programmatic dependent launch (Hopper or newer); gemv_max_rows: the largest decode batch (<= 8) that runs
    the loop-free GEMV kernel; fused_max_rows: the largest that runs the tiled fused-linear kernel (larger: cuBLAS)."""

    def __init__(self, model: MultiExitGPT2, tokenizer=None, backend: str | Backend = "auto", engine: str = "auto",
                 compile: bool = False, pdl: bool | None = None, fused_max_rows: int | None = None,
                 gemv_max_rows: int | None = None, generation_config=None):
        self.model = model
        self.tokenizer = tokenizer
        read = generation_config is None  # else one carried over from a copy of this model: named already
        self.generation_config = read_generation_config(model.folder) if read else generation_config
        self.defaults = generation_defaults(self.generation_config, warn=read)
        self.settings = dict(backend=backend, engine=engine, compile=compile, pdl=pdl, fused_max_rows=fused_max_rows,
                             gemv_max_rows=gemv_max_rows)
        if isinstance(backend, Backend):
            self.backend = backend
        else:
            self.backend = resolve_backend(backend, model.device, pdl, fused_max_rows, gemv_max_rows)
        self.compile = compile  # torch.compile the layers of static steps (static / graph engines)
        self.engine = engine
        if compile and not self.compiles:
            warnings.warn(f"compile ignored: nothing is compiled on the {self.engine} engine with the "
                          f"{self.backend.name} backend (it applies to the static/graph engines' torch layers)",
                          stacklevel=3)

    @property
    def compiles(self) -> bool:
        """Whether `compile` compiles anything: the static / graph engines' torch layers."""
        return self.compile and self.engine != "eager" and not self.backend.triton

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
        """Change backend settings in place (pdl, fused_max_rows, gemv_max_rows): later calls build steps for the new
        settings."""
        self.backend = dataclasses.replace(self.backend, **changes)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, dtype=None, device=None, backend: str = "auto",
                        engine: str = "auto", compile: bool = False, check_weights: bool = True,
                        pdl: bool | None = None, fused_max_rows: int | None = None,
                        gemv_max_rows: int | None = None, revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        subfolder: str = "") -> MultiExitLM:
        """dtype None: fp16 on CUDA, fp32 on CPU (as `mexit.load` and the CLI; the drop-in keeps the stored dtype, as
        transformers 5 does). revision, token, cache_dir, local_files_only, subfolder: huggingface_hub's
        (`mexit.model.checkpoint.HubOptions`)."""
        hub = HubOptions(revision, token, cache_dir, local_files_only, subfolder)
        model = load_model(path_or_id, dtype=dtype, device=device, check_weights=check_weights, hub=hub)
        return cls(model, load_tokenizer(model.folder), backend=backend, engine=engine, compile=compile, pdl=pdl,
                   fused_max_rows=fused_max_rows, gemv_max_rows=gemv_max_rows)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype=None, device="cpu", backend="auto",
               engine="auto", compile: bool = False, pdl: bool | None = None, fused_max_rows: int | None = None,
               gemv_max_rows: int | None = None) -> MultiExitLM:
        """RANDOM weights of `config`'s shape (benchmarks, tests); `is_random` says so."""
        return cls(random_model(config, seed=seed, dtype=dtype, device=device), backend=backend, engine=engine,
                   compile=compile, pdl=pdl, fused_max_rows=fused_max_rows, gemv_max_rows=gemv_max_rows)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def is_random(self) -> bool:
        return self.model.random_weights

    def encode(self, prompts, attention_mask=None) -> list[list[int]]:
        """str / list[str] through the tokenizer; token ids pass through; a [B, T] id tensor with its attention mask
        [B, T] (1: token, 0: padding, left or right) keeps each row's tokens."""
        if attention_mask is not None:
            if isinstance(prompts, np.ndarray):
                prompts = torch.from_numpy(prompts)
            if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2:
                raise ValueError("attention_mask goes with a [batch, length] tensor of token ids")
            mask = torch.as_tensor(attention_mask).bool()
            if mask.shape != prompts.shape:
                raise ValueError(f"attention_mask {tuple(mask.shape)} does not match the ids {tuple(prompts.shape)}")
            return [row[m].tolist() for row, m in zip(prompts.cpu(), mask.cpu())]
        if isinstance(prompts, Mapping):  # a tokenizer's output (BatchEncoding), a dict
            raise ValueError("prompts is a mapping (a tokenizer's output?): pass its input_ids, with attention_mask= "
                             "for padded rows")
        if isinstance(prompts, bool):
            raise ValueError(f"prompts must be text, a list of texts or token ids, got {prompts!r}")
        prompts = plain(prompts)  # numpy / torch ids (and numpy string arrays) as lists
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, (list, tuple)) and any(isinstance(p, str) for p in prompts):  # texts (and id lists)
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer files: pass token ids instead of text")
            if any(p == "" for p in prompts):
                raise ValueError("empty prompt: every row needs at least one token")
            # lengths: checked by mexit
            return [self.tokenizer.encode(p, verbose=False) if isinstance(p, str) else plain(p) for p in prompts]
        return prompts

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int | None = None, *, mode=None,
                 exit_layer: int | None = None, contrast: tuple | None = None, alpha: float = 0.1,
                 min_candidates: int = 1, multi_exit_config: MultiExitConfiguration | None = None,
                 decode: DecodeConfig | None = None, early_exit: ExitPolicy | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None,
                 seed: int | list[int] | None = None, eos_token_id: int | list[int] | None | str = "config",
                 attention_mask=None, return_cache: bool = False, on_token=None, keep_logits: bool = False,
                 speculative: SpeculativeConfig | None = None, sampling: SamplingConfig | None = None,
                 dola_layers: str | list[int] | None = None, dola_heads: str = "embedding",
                 repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                 stop_strings: str | list[str] | None = None, stop=None, **acd_names) -> GenerationResult:
        """Generate up to `max_new_tokens` per prompt (text, a list of texts, token ids, a list of id lists, or a
        [B, T] id tensor with its `attention_mask`: padding is dropped, left or right).

        Modes: `mode=` a mode's settings (`mexit.decoding.modes.settings_classes()`) or a string of the mode
        mini-language ("exit:12", "acd:24,12", "ee:max-prob:0.9", "dola:high", "spec:12:2"; `mexit.decoding.modes`),
        or the keywords: original head (default), `exit_layer=L`, `contrast=(upper, lower)` (ACD; upper may be
        "original"), autocontrastive-gen's `use_original_head`/`output_layer_index`/`contrast_layer_indices` or
        `multi_exit_config`, or a ready `decode=DecodeConfig(...)`; naming two modes is an error.
        `early_exit=ExitPolicy(...)` runs the confidence-gated scheduler instead, and
        `speculative=SpeculativeConfig(...)` decodes the chosen mode self-speculatively (the same greedy tokens, the
        same sampling distribution). `dola_layers="low" | "high" | [layers]` decodes with DoLa as transformers 4.51.3
        did (`mexit.decoding.dola`; each row picks its own premature layer), `dola_heads="exit"` with the
        checkpoint's exit heads as the premature distributions. Every mode runs on every engine.

        Arguments left None take the checkpoint's generation_config.json (max_new_tokens, or max_length minus the
        longest prompt; do_sample, temperature, top_k, top_p), then mexit's defaults (32 tokens, greedy, temperature
        1, no top-k / top-p). eos_token_id: "config" stops at the checkpoint's stop ids (generation_config.json, else
        config.json), an id or a list of ids stops at those, None never stops early. seed: one for every row or one
        per row (each row samples from its own random stream, so a row gets the same tokens alone and in any batch,
        in fp32; half precision may differ in the last bits between batch compositions); a sampled run without one
        draws one and reports it as `result.seed`. return_cache keeps the real rows' final KV cache on the result
        (`KVCache`: k, v [n_layer, B, n_head, slots, head_dim], valid [B, slots] marking the slots that hold a real
        token; how many slots, and where the holes are, is the engine's: left padding, a static engine's length
        bucket, a speculative round's rejected drafts). keep_logits: every step's [B, V] fp32 logits of the mode
        (fixed modes: the head's, ACD's log q; DoLa: its contrast scores) as the mode computes them, before the
        repetition controls, temperature and top-k / top-p. on_token(tokens [B])
        receives the tokens of every position as it completes (a device tensor; a finished row reads eos, and once
        every row has finished it is not called again). repetition_penalty, no_repeat_ngram_size: transformers'
        (1 / 0: off; every mode), applied to the mode's scores before the choice (early exit: to each checked
        head's logits, confidence included; speculative: to the drafts' and the target's). sampling: a ready
        SamplingConfig instead of do_sample ... seed and the repetition controls. stop_strings: a row ends at the
        token whose text completes one of them (kept, as transformers keeps it; the tokenizer decodes the row's new
        tokens); stop: a rule `stop(tokens) -> [bool per row]` over every row's new tokens so far
        (`mexit.decoding.stopping.StopWatch`). Either costs one host read per step."""
        (max_new_tokens, exit_layer, contrast, alpha, min_candidates, do_sample, temperature, top_k, top_p, seed,
         eos_token_id, dola_layers, repetition_penalty, no_repeat_ngram_size) = plain(
            (max_new_tokens, exit_layer, contrast, alpha, min_candidates, do_sample, temperature, top_k, top_p, seed,
             eos_token_id, dola_layers, repetition_penalty, no_repeat_ngram_size))  # numpy / torch values too
        acd_names = {name: plain(value) for name, value in acd_names.items()}
        sampling = self.sampling_settings(sampling, do_sample, temperature, top_k, top_p, seed, repetition_penalty,
                                          no_repeat_ngram_size)
        eos = stop_ids_in_vocabulary(self.stop_ids() if eos_token_id == "config" else eos_token_id,
                                     self.config.vocab_size, passed=eos_token_id != "config")
        ids = self.encode(prompts, attention_mask)
        max_new_tokens = self.new_tokens(max_new_tokens, ids)
        spec = mode_settings(mode, exit_layer, contrast, alpha, min_candidates, multi_exit_config, decode, early_exit,
                             speculative, dola_layers, dola_heads, acd_names, self.config)
        if isinstance(spec, ExitPolicy):
            spec.check_engine(self.engine, self.backend.name)
        if stop_strings is not None:
            stop = self.stop_rule(stop_strings, stop)
        result = generate(self.model, ids, modes.build(self.model, spec), self._engine, self.backend, max_new_tokens,
                          sampling, eos, on_token=on_token, return_cache=return_cache, keep_logits=keep_logits,
                          stop=stop)
        result.seed = sampling.seed if sampling.do_sample else None
        if self.tokenizer is not None:
            result.text = [self.tokenizer.decode(row) for row in result.tokens]
        return result

    def sampling_settings(self, sampling, do_sample, temperature, top_k, top_p, seed, repetition_penalty,
                          no_repeat_ngram_size) -> SamplingConfig:
        """`generate`'s sampling arguments as one SamplingConfig: those left None from the checkpoint's
        generation_config.json, then mexit's defaults; a sampled run without a seed draws one. Error: a ready
        `sampling` together with any of them."""
        d = self.defaults
        if sampling is None:
            sampling = SamplingConfig(bool(first(do_sample, d.get("do_sample"), False)),
                                      first(temperature, d.get("temperature"), 1.0), first(top_k, d.get("top_k"), 0),
                                      first(top_p, d.get("top_p"), 1.0), seed,
                                      repetition_penalty=first(repetition_penalty, d.get("repetition_penalty"), 1.0),
                                      no_repeat_ngram_size=first(no_repeat_ngram_size, d.get("no_repeat_ngram_size"),
                                                                 0))
        elif any(v is not None for v in (do_sample, temperature, top_k, top_p, seed, repetition_penalty,
                                         no_repeat_ngram_size)):
            raise ValueError("sampling= sets do_sample, temperature, top_k, top_p, seed and the repetition controls: "
                             "do not pass them too")
        unused = [n for n, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed))
                  if v is not None]
        if unused and not sampling.do_sample:  # not ignored in silence (transformers warns the same way)
            warnings.warn(f"{', '.join(unused)} unused: greedy decoding (pass do_sample=True to sample)", stacklevel=3)
        if sampling.do_sample and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=int(torch.randint(2**31 - 1, ())))
        return sampling

    def new_tokens(self, max_new_tokens: int | None, ids: list[list[int]]) -> int:
        """`generate`'s token budget: as given, else generation_config.json's max_new_tokens, or its max_length
        minus the longest prompt, else DEFAULT_MAX_NEW_TOKENS. Error: a max_length that leaves no room."""
        d = self.defaults
        if max_new_tokens is None:
            max_new_tokens = d.get("max_new_tokens")
        if max_new_tokens is None and "max_length" in d:
            max_new_tokens = d["max_length"] - max(map(len, ids))
            if max_new_tokens < 1:
                raise ValueError(f"generation_config.json's max_length {d['max_length']} leaves no room after the "
                                 "longest prompt: pass max_new_tokens")
        return DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens

    def layer_predictions(self, prompts, top_k: int = 5, attention_mask=None) -> list[LayerPredictions]:
        """Per prompt (text, texts, ids or id lists, or a padded [B, T] id tensor with its `attention_mask`, as
        `generate` takes them): what each exit head and the original head predict at every position of the prompt's
        tokens, from one pass through the blocks (`mexit.decoding.layers`): top-k tokens with their log-probabilities
        and each head's entropy (nats); shapes in LayerPredictions."""
        ids = check_prompts(self.encode(prompts, attention_mask), self.config, None)
        return [layer_predictions(self.model, row, top_k) for row in ids]

    def stop_rule(self, stop_strings, rule=None):
        """A stop rule (`mexit.decoding.stopping.StopWatch`) ending a row once its new tokens' text holds one of
        `stop_strings` (or `rule` says so)."""
        strings = [stop_strings] if isinstance(stop_strings, str) else plain(stop_strings)
        if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(x, str) and x for x in strings):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
        if self.tokenizer is None:
            raise ValueError("stop_strings needs the checkpoint's tokenizer files (this one has none): pass stop= "
                             "or eos_token_id= instead")
        window = 4 * max(map(len, strings)) + 1  # tokens that can hold a string's bytes (a token holds >= 1 byte)
        decode = self.tokenizer.decode

        def ends(tokens: list[list[int]]) -> list[bool]:
            done = [any(x in decode(row[-window:]) for x in strings) for row in tokens]
            return done if rule is None else [a or b for a, b in zip(done, row_verdicts(rule(tokens), len(tokens)))]

        return ends

    def stop_ids(self):
        """The checkpoint's stop ids: generation_config.json's eos_token_id, else config.json's."""
        return self.defaults.get("eos_token_id", self.config.eos_token_id)


def first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def load(path_or_id, dtype=None, device=None, backend: str = "auto", engine: str = "auto", compile: bool = False,
         check_weights: bool = True, pdl: bool | None = None, fused_max_rows: int | None = None,
         gemv_max_rows: int | None = None, revision: str | None = None, token: str | bool | None = None,
         cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
         subfolder: str = "") -> MultiExitLM:
    """Load a GPT-2 or multi-exit GPT-2 checkpoint (local folder or hub id) ready to `generate`.

    revision (branch, tag or commit), token, cache_dir, local_files_only, subfolder: as in transformers'
    from_pretrained, passed to huggingface_hub (a revision asked of a local folder, or missing from the cache with
    local_files_only, is an error naming it).

    dtype: fp32 / fp16 / bf16, or "auto" (the stored dtype); None: fp16 on CUDA, fp32 elsewhere (the CLI's rule too;
    the drop-in's from_pretrained keeps the stored dtype, as transformers 5 does).
    backend: ops through "triton" kernels or the "torch" references (auto: triton on CUDA).
    engine: "graph" (CUDA graphs), "static" (the same steps without capture) or "eager" (auto: graph on CUDA).
    compile: torch.compile the static steps' layers (torch backend). check_weights: refuse tensors that hold NaN or
    inf (naming them). Triton backend, None: what the card's measurements chose (`mexit/ops/routes.json`; on
    other devices the kernels wherever they run): pdl, programmatic dependent launch (Hopper or newer; off on every
    card measured so far: 2.6 % slower at batch 1 on an H200, bench/RESULTS.md); gemv_max_rows, the largest decode
    batch (<= 8) on the loop-free GEMV block linears; fused_max_rows, the largest on the tiled fused-linear kernel
    (above both: cuBLAS)."""
    return MultiExitLM.from_pretrained(path_or_id, dtype=dtype, device=device, backend=backend, engine=engine,
                                       compile=compile, check_weights=check_weights, pdl=pdl,
                                       fused_max_rows=fused_max_rows, gemv_max_rows=gemv_max_rows, revision=revision,
                                       token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                                       subfolder=subfolder)
