"""lm-evaluation-harness model `mexit`: lm-eval's `hf` model (`HFLM`: tokenization, request ordering, batching,
truncation, stop sequences, caching) with mexit's forward and generate underneath.

    mexit eval --model_args pretrained=PATH,contrast=[24,12] --tasks hellaswag --batch_size 8
    import mexit.frontends.harness; lm_eval.simple_evaluate(model="mexit", model_args="pretrained=PATH", ...)

`loglikelihood` / `loglikelihood_rolling` score with the chosen mode's distribution at every position: the original
head, one exit (`exit_layer=L`) or ACD (`contrast=[U,L]`, its log q); speculative decoding (`draft_exit=`) is lossless,
so it scores as its target mode. Early exit and DoLa are decoding rules, not a distribution over the continuation's
tokens (early exit's head at a position depends on its own confidence and on the states it propagated at earlier
positions; DoLa's scores are -inf outside each step's plausible set): they generate (`generate_until`) and are
refused by name for log-likelihoods. `generate_until` runs `MultiExitLM.generate` in every mode, batched, ending a row
at its stop sequences (`stop_strings`) or `max_gen_toks`; sampling follows lm-eval's gen_kwargs and its seeds
(torch's global seed draws the run's sampling seed).
"""

from __future__ import annotations

import inspect
import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from mexit.decoding import modes
from mexit.decoding.early_exit import ExitPolicy
from mexit.decoding.fixed import teacher_forced
from mexit.decoding.heads import DecodeConfig
from mexit.decoding.speculative import Speculation, SpeculativeConfig
from mexit.model.checkpoint import local_folder

from .api import MultiExitLM, decode_config, mode_settings

# gen_kwargs mexit's generate takes as they are (lm-eval's own: until, max_gen_toks, do_sample, temperature)
GEN_KWARGS = ("top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")


def layer_pair(value, name: str) -> tuple:
    """contrast given as [24, 12], (24, 12), "24,12" or "original:12" (model_args values) as (upper, lower)."""
    if isinstance(value, str):
        value = value.replace(":", ",").split(",")
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} takes two layers [upper,lower] (upper may be original), got {value!r}")
    return tuple(v if v == "original" else int(v) for v in value)


class Loaded:
    """What HFLM reads of a ready model: its device and transformers config."""

    def __init__(self, device: torch.device, config):
        self.device, self.config = device, config


@register_model("mexit")
class MexitLM(HFLM):
    """lm-eval's `hf` model on mexit. Mode (model_args): `mode=original` (default), `exit_layer=L`,
    `contrast=[U,L]` with `alpha`, `min_candidates` (ACD); `early_exit=THRESHOLD` with `measure`; `draft_exit=L`
    with `draft_len` (speculative, over the fixed mode); `dola_layers=low|high|[layers]` with `dola_heads`.
    Loading: `pretrained`, `dtype` ("auto": the stored dtype, as lm-eval's hf model; fp16 is mexit's fast one),
    `device`, `backend`, `engine`, and the hub's `revision`, `subfolder`, `token`, `cache_dir`,
    `local_files_only`. lm-eval's `batch_size` (an int), `max_batch_size`, `max_length`, `truncation`,
    `logits_cache`, `add_bos_token`, `prefix_token_id` keep their `hf` meaning; other `hf` arguments are refused by
    name."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's constructor from a `model_args` string (see `create_from_arg_obj`)."""
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's constructor from `model_args` and its own settings (batch_size, max_batch_size, device): a
        setting given both ways is taken once where the two agree and refused where they differ (lm-eval would
        pass both: a TypeError)."""
        args = dict(arg_dict)
        for key, other in (additional_config or {}).items():
            if other is None:
                continue
            if key in args and str(args[key]) != str(other):
                raise ValueError(f"{key} is given twice: {args[key]!r} in model_args and {other!r} by --{key}: give "
                                 "it once")
            args.setdefault(key, other)
        return cls(**args)

    def __init__(self, pretrained=None, mode: str | None = None, exit_layer: int | None = None, contrast=None,
                 alpha: float = 0.1, min_candidates: int = 1, early_exit: float | None = None,
                 measure: str | None = None, draft_exit: int | None = None, draft_len: int | None = None,
                 dola_layers=None, dola_heads: str | None = None, device: str | None = None, dtype: str = "auto",
                 backend: str = "auto", engine: str = "auto", batch_size: int | str = 1,
                 max_batch_size: int | None = 64, max_length: int | None = None, truncation: bool = False,
                 logits_cache: bool = True,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, revision: str | None = None,
                 subfolder: str = "", token: str | None = None, cache_dir: str | None = None,
                 local_files_only: bool = False, trust_remote_code: bool | None = None, **unsupported):
        device = self.refuse(pretrained, batch_size, device, unsupported)
        lm = MultiExitLM.from_pretrained(str(pretrained), dtype=dtype, device=device, backend=backend, engine=engine,
                                         revision=None if revision is None else str(revision), token=token,
                                         cache_dir=cache_dir, local_files_only=local_files_only,
                                         subfolder=subfolder)
        if lm.tokenizer is None:
            raise ValueError(f"{pretrained} has no tokenizer files: lm-eval scores text")
        self.mode_kwargs = self.mode_arguments(lm, mode, exit_layer, contrast, alpha, min_candidates, early_exit,
                                               measure, draft_exit, draft_len, dola_layers, dola_heads)
        spec = mode_settings(**self.mode_kwargs, config=lm.config)  # what generate runs; scoring: its fixed mode
        self.decode = spec.target if isinstance(spec, Speculation) else spec if isinstance(spec, DecodeConfig) else None
        model = Loaded(lm.model.device, lm.config.to_hf())
        quiet = logging.getLogger("lm_eval.models.huggingface")
        level = quiet.level  # HFLM warns that a ready model skips its loading arguments: here that is the design
        quiet.setLevel(logging.ERROR)
        try:
            super().__init__(pretrained=model, backend="causal", tokenizer=lm.tokenizer, truncation=truncation,
                             logits_cache=logits_cache, max_length=max_length, batch_size=int(batch_size),
                             max_batch_size=max_batch_size, add_bos_token=add_bos_token,
                             prefix_token_id=prefix_token_id)
        finally:
            quiet.setLevel(level)
        self.lm, self.pretrained, self.revision = lm, str(pretrained), revision

    @staticmethod
    def refuse(pretrained, batch_size, device, unsupported: dict) -> torch.device | None:
        """The arguments' errors found before loading (ValueError, NotImplementedError); the device as torch's."""
        if pretrained is None:
            raise ValueError("the mexit model needs the checkpoint: --model_args pretrained=FOLDER (or a hub id)")
        if unsupported:
            raise NotImplementedError(f"model_args not supported by lm-eval's mexit model: {sorted(unsupported)} "
                                      "(see `help(mexit.frontends.harness.MexitLM)`)")
        if str(batch_size).startswith("auto"):
            raise NotImplementedError("batch_size=auto is not supported by the mexit model: pass a number")
        if device in ("cuda", "cpu") or device is None or str(device).startswith("cuda:"):
            return torch.device(device) if device else None
        raise ValueError(f"device {device!r}: mexit runs on cpu or cuda")

    @classmethod
    def check_arguments(cls, model_args: dict) -> None:
        """`refuse` and the checkpoint's local folder (`local_folder`) on model_args as lm-eval parsed them, without
        loading: `mexit eval` runs it before lm-eval indexes its tasks (about 10 s)."""
        try:
            bound = inspect.signature(cls.__init__).bind_partial(None, **model_args).arguments
        except TypeError as err:  # a key named self
            raise ValueError(f"model_args: {err}") from None
        cls.refuse(bound.get("pretrained"), bound.get("batch_size", 1), bound.get("device"),
                   bound.get("unsupported", {}))
        local_folder(str(bound["pretrained"]))

    @staticmethod
    def mode_arguments(lm, mode, exit_layer, contrast, alpha, min_candidates, early_exit, measure, draft_exit,
                       draft_len, dola_layers, dola_heads) -> dict:
        """model_args as `MultiExitLM.generate`'s mode arguments (checked against the checkpoint now). mode may be a
        string of the mode mini-language without commas (lm-eval splits model_args at them): exit:12,
        ee:max-prob:0.9, dola:high, spec:12:2. A setting of a mode that was not chosen is refused by name."""
        for name, value, owner, owner_value in (("measure", measure, "early_exit", early_exit),
                                                ("draft_len", draft_len, "draft_exit", draft_exit),
                                                ("dola_heads", dola_heads, "dola_layers", dola_layers)):
            if value is not None and owner_value is None:
                raise ValueError(f"{name}={value} applies with {owner}=..., which is not given (a mode string carries "
                                 "its own settings)")
        measure = "max-prob" if measure is None else measure
        draft_len = 1 if draft_len is None else draft_len
        dola_heads = "embedding" if dola_heads is None else dola_heads
        if isinstance(mode, str) and ":" in mode:
            if exit_layer is not None or contrast is not None or early_exit is not None or draft_exit is not None \
                    or dola_layers is not None:
                raise ValueError(f"mode={mode} chooses the mode: pass no other mode argument")
            modes.parse(mode, lm.config)
            acd = dict(alpha=float(alpha), min_candidates=int(min_candidates))
            return dict(mode=mode, **(acd if (acd["alpha"], acd["min_candidates"]) != (0.1, 1) else {}))
        fixed = dict(mode=mode, exit_layer=exit_layer, contrast=None if contrast is None else layer_pair(contrast,
                                                                                                        "contrast"))
        fixed = {k: v for k, v in fixed.items() if v is not None}
        if early_exit is not None or dola_layers is not None:
            if fixed or draft_exit is not None or (early_exit is not None and dola_layers is not None):
                raise ValueError("early_exit and dola_layers each choose the mode: pass no other mode argument")
            if early_exit is not None:
                return dict(early_exit=ExitPolicy(float(early_exit), measure=measure))
            layers = dola_layers if dola_layers in ("low", "high") else tuple(
                int(x) for x in (str(dola_layers).strip("[]()").split(",") if not isinstance(dola_layers, (list,
                                                                                                         tuple))
                                 else dola_layers))
            return dict(dola_layers=layers if isinstance(layers, str) else list(layers), dola_heads=dola_heads)
        kwargs = dict(**fixed, alpha=float(alpha), min_candidates=int(min_candidates))
        decode_config(**kwargs).check(lm.config)
        if draft_exit is not None:
            kwargs["speculative"] = SpeculativeConfig(int(draft_exit), int(draft_len))
        return kwargs

    def get_model_info(self) -> dict:
        """What lm-eval records of the model: mexit's mode, backend, engine, dtype and the checkpoint folder."""
        settings = {k: str(v) for k, v in self.mode_kwargs.items()}
        from mexit.model.checkpoint import named_weights

        return dict(model_num_parameters=sum(t.numel() for _name, t in named_weights(self.lm.model.w)),
                    model_dtype=str(self.lm.model.dtype), model_revision=self.revision or "",
                    model_folder=str(self.lm.model.folder), mexit_mode=settings, mexit_backend=self.lm.backend.name,
                    mexit_engine=self.lm.engine)

    def scoring_mode(self) -> None:
        """Log-likelihoods come from a distribution: refused by name for early exit and DoLa."""
        if self.decode is None:
            name = next((n for n in ("early_exit", "dola_layers") if n in self.mode_kwargs),
                        f"mode={self.mode_kwargs.get('mode')}")
            raise NotImplementedError(
                f"loglikelihood with {name}: it is a decoding rule, not a distribution over a continuation's "
                "tokens (early exit's head depends on its own decisions and propagated states, DoLa's scores "
                "are -inf outside each step's plausible set); run generation tasks with it, and score with "
                "exit_layer=L, contrast=[U,L] or the original head")

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.scoring_mode()
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self.scoring_mode()
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """[B, T] ids (right-padded by lm-eval: causal, so padding after a row never reaches its positions) -> the
        mode's logits [B, T, V] (ACD: log q)."""
        with torch.inference_mode():
            ids = inps.to(self.lm.model.device)
            return teacher_forced(self.lm.model, self.decode, ids, torch.ones_like(ids, dtype=torch.bool))[0]

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """The contexts [B, T] (left-padded, with `attention_mask`) continued by mexit's generate in the chosen mode:
        [B, T + new] (rows padded after their end). Stop sequences end a row early; lm-eval cuts the text at
        them."""
        mask = generation_kwargs.pop("attention_mask", None)
        temperature = generation_kwargs.pop("temperature", 0.0)
        do_sample = generation_kwargs.pop("do_sample", None)
        do_sample = bool(temperature) if do_sample is None else bool(do_sample)
        if do_sample and not temperature:
            raise ValueError("gen_kwargs do_sample=True with temperature 0: set a temperature above 0")
        refused = sorted(set(generation_kwargs) - set(GEN_KWARGS))
        if refused:
            raise NotImplementedError(f"gen_kwargs not supported by the mexit model: {refused}")
        sampling = dict(do_sample=True, temperature=float(temperature)) if do_sample else dict(do_sample=False)
        result = self.lm.generate(context, max_length - context.shape[1], attention_mask=mask,
                                  stop_strings=[s for s in stop if s] or None, **sampling, **generation_kwargs,
                                  **self.mode_kwargs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        new = torch.full((len(result.tokens), max(map(len, result.tokens))), pad, dtype=torch.long)
        for b, row in enumerate(result.tokens):
            new[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return torch.cat([context.cpu(), new], dim=1)
