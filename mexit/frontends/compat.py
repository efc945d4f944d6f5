"""Drop-in front ends: transformers-style `generate` and autocontrastive-gen's `AutoMultiExitModel`.

    model = AutoMultiExitModel.from_pretrained(path, multi_exit_config=MultiExitConfiguration(
        use_original_head=False, contrast_layer_indices=("original", 12)))
    output_ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32)   # like transformers

Outputs follow transformers: prompt + new tokens in one tensor; a row that produced eos is padded with
pad_token_id (eos when unset) until every row has finished or max_new_tokens is reached;
`return_dict_in_generate=True` with `output_scores` / `output_logits` adds per-step [B, V] tensors. `model(input_ids)`
returns `.logits` of the configured head (ACD's log q in contrast mode) at every position, as
autocontrastive-gen's forward does, and `.loss` with `labels=`. The object answers what scripts call after
`from_pretrained` (`eval`, `to`, `device`, `dtype`, `config`, `generation_config`, `parameters`, `save_pretrained`);
what it does not implement raises NotImplementedError naming it.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch

from mexit.decoding.dola import DolaConfig
from mexit.decoding.fixed import MultiExitConfiguration, teacher_forced
from mexit.decoding.heads import DecodeConfig
from mexit.decoding.sampling import SamplingConfig, kept_tokens
from mexit.generate import stop_ids_in_vocabulary
from mexit.model.decoder import MultiExitGPT2
from mexit.model.generation_config import OFF, unimplemented
from mexit.model.placement import resolve_device, resolve_dtype
from mexit.values import plain

from .api import ACD_NAMES, MultiExitLM, first, mode_settings

TRANSFORMERS_MAX_NEW_TOKENS = 20  # transformers 5: new tokens when no max_length is set anywhere


def unset(value) -> bool:
    """A keyword left at an off value (None or False; a tensor is never one: `in` would compare its elements)."""
    return value is None or value is False


class UnsupportedAttribute(NotImplementedError, AttributeError):
    """A transformers model attribute the drop-in does not offer (hasattr() still answers False)."""


def resolve_device_map(device_map, device):
    """transformers' device_map as one device: "auto" (cuda when available), a device string, index or
    torch.device. Several devices (a dict) are not supported."""
    if device_map is None:
        return device
    if device is not None:
        raise ValueError("pass device or device_map, not both")
    if isinstance(device_map, dict):
        if len(set(device_map.values())) > 1:
            raise NotImplementedError("device_map over several devices is not supported: mexit runs one device")
        device_map = next(iter(device_map.values()), "auto")
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def dtype_name(torch_dtype) -> str | None:
    """transformers' torch_dtype ("auto": the checkpoint's stored dtype, a torch dtype or its name) as mexit's."""
    return None if torch_dtype is None else str(torch_dtype).removeprefix("torch.")


class FastMultiExitModel:
    """A multi-exit GPT-2 with a fixed decoding mode and transformers' generate signature."""

    def __init__(self, lm: MultiExitLM, decode: DecodeConfig, generation_config=None):
        from transformers import GenerationConfig

        decode.check(lm.config)
        self.lm, self.decode = lm, decode
        self.config = lm.config.to_hf()
        self.generation_config = generation_config or GenerationConfig.from_model_config(self.config)
        # the checkpoint's fields named at load as not applied (`generation_defaults`), with their values: not applied
        # while they hold them (a field the caller sets later is the caller's, and refused)
        self.not_applied = unimplemented(self.generation_config)

    @classmethod
    def from_pretrained(cls, path_or_id, multi_exit_config: MultiExitConfiguration | None = None, dtype="auto",
                        device=None, backend="auto", engine="auto", torch_dtype=None, device_map=None,
                        check_weights: bool = True, revision: str | None = None, token: str | bool | None = None,
                        cache_dir=None, local_files_only: bool = False, subfolder: str = "",
                        trust_remote_code: bool | None = None, **mode) -> FastMultiExitModel:
        """transformers-style loading. dtype (or transformers' torch_dtype: a dtype, its name or "auto") defaults
        to "auto", the stored dtype, as transformers 5 loads (autocontrastive-gen's checkpoint: fp32); pass
        dtype="fp16" for mexit's faster half-precision decode on CUDA. device_map: "auto" or one device. revision,
        token, cache_dir, local_files_only, subfolder: huggingface_hub's, as transformers takes them.
        trust_remote_code is accepted and has no effect (mexit never runs a checkpoint's code). The decoding mode:
        multi_exit_config, autocontrastive-gen's names, or mexit's (mode: a name or a fixed mode's string of the
        mode mini-language, "exit:12", "acd:24,12"; exit_layer, contrast, alpha, min_candidates)."""
        unknown = set(mode) - {"mode", "exit_layer", "contrast", "alpha", "min_candidates", *ACD_NAMES}
        if unknown:
            raise NotImplementedError(f"from_pretrained arguments not supported by mexit: {sorted(unknown)}")
        if torch_dtype is not None:
            if dtype not in (None, "auto"):
                raise ValueError("pass dtype or torch_dtype, not both")
            dtype = dtype_name(torch_dtype)
        if trust_remote_code:
            warnings.warn("trust_remote_code=True has no effect: mexit runs its own GPT-2 code, never a "
                          "checkpoint's", stacklevel=2)
        device = resolve_device(resolve_device_map(device_map, device))
        lm = MultiExitLM.from_pretrained(path_or_id, dtype=dtype, device=device, backend=backend, engine=engine,
                                         check_weights=check_weights, revision=revision, token=token,
                                         cache_dir=cache_dir, local_files_only=local_files_only, subfolder=subfolder)
        if mode and multi_exit_config is not None:
            raise ValueError("pass either multi_exit_config or mexit's mode arguments, not both")
        if not mode:
            return cls(lm, (multi_exit_config or MultiExitConfiguration()).to_decode_config(), lm.generation_config)
        acd_names = {name: mode.pop(name) for name in ACD_NAMES if name in mode}
        decode = mode_settings(**mode, acd_names=acd_names, config=lm.config)
        if not isinstance(decode, DecodeConfig):
            raise ValueError(f"mode={mode.get('mode')!r}: the drop-in's configured mode is a fixed one (original, "
                             "exit:L, contrast:UPPER,LOWER); DoLa and speculative decoding are generate() arguments "
                             "(dola_layers=, speculative=), early exit runs through mexit.MultiExitLM")
        return cls(lm, decode, lm.generation_config)

    @property
    def device(self) -> torch.device:
        return self.lm.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.model.dtype

    def eval(self) -> FastMultiExitModel:
        """Inference only, always: returns self."""
        return self

    def train(self, mode: bool = True) -> FastMultiExitModel:
        if mode:
            raise NotImplementedError("train(): mexit is an inference runtime (to train exit heads use "
                                      "`mexit train-heads`)")
        return self

    def requires_grad_(self, requires_grad: bool = True) -> FastMultiExitModel:
        if requires_grad:
            raise NotImplementedError("requires_grad_(True): mexit is an inference runtime")
        return self

    def parameters(self):
        """The weight tensors (per-layer tensors stacked over layers), as transformers' parameters() yields them."""
        from mexit.model.checkpoint import named_weights

        return (tensor for _name, tensor in named_weights(self.lm.model.w))

    def save_pretrained(self, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                        max_shard_size: int | str = "50GB", safe_serialization: bool = True, variant=None,
                        **kwargs) -> None:
        """transformers' save_pretrained (its order and defaults): the weights in their current dtype as safetensors
        (sharded with an index above max_shard_size), config.json keeping the source's fields, this model's
        generation_config, and the source's tokenizer files (`mexit.model.save.save_checkpoint`). Options mexit
        does not implement (a state_dict, push_to_hub, a variant, pickle files, any other keyword) raise
        NotImplementedError naming them when they are set to anything but their default."""
        from mexit.model.save import save_checkpoint

        asked = {"state_dict": state_dict, "push_to_hub": push_to_hub, "variant": variant, **kwargs}
        refused = sorted(name for name, value in asked.items() if not unset(value))
        if refused:
            raise NotImplementedError(f"save_pretrained arguments not supported by mexit: {refused}")
        if not safe_serialization:
            raise NotImplementedError("save_pretrained(safe_serialization=False): mexit writes safetensors only")
        if is_main_process:
            save_checkpoint(self.lm.model, save_directory, max_shard_size)
            self.generation_config.save_pretrained(save_directory)

    def to(self, *args, **kwargs) -> FastMultiExitModel:
        """`.to(device)`, `.to(dtype)` or both, as torch modules take them; moves the weights in place."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise NotImplementedError(f"to() arguments not supported: {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        device = resolve_device(device) if device is not None else self.device
        dtype = resolve_dtype(dtype) if dtype is not None else self.dtype
        if device == self.device and dtype == self.dtype:
            return self
        old = self.lm
        model = MultiExitGPT2(old.model.config, old.model.w.to(device=device, dtype=dtype), folder=old.model.folder,
                              random_weights=old.model.random_weights)
        model.predictors = old.model.predictors.to(device) if old.model.predictors is not None else None
        model.token_counts = old.model.token_counts
        self.lm = MultiExitLM(model, old.tokenizer, generation_config=old.generation_config,
                              **old.settings)  # the settings asked for, pdl included
        return self

    def cuda(self, device=None) -> FastMultiExitModel:
        return self.to("cuda" if device is None else device)

    def cpu(self) -> FastMultiExitModel:
        return self.to("cpu")

    def half(self) -> FastMultiExitModel:
        return self.to(torch.float16)

    def float(self) -> FastMultiExitModel:
        return self.to(torch.float32)

    def bfloat16(self) -> FastMultiExitModel:
        return self.to(torch.bfloat16)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        raise UnsupportedAttribute(f"{type(self).__name__}.{name} is not implemented by mexit's drop-in (it offers "
                                  "generate, __call__ / forward, eval, to, device, dtype, config, generation_config, "
                                  "parameters, save_pretrained)")

    def _settings(self, generation_config, kwargs) -> object:
        """The call's GenerationConfig: the one passed (else the model's) updated with kwargs; a field set away from
        its off values that mexit does not implement is refused by name."""
        config = copy.deepcopy(generation_config or self.generation_config)
        if generation_config is None:  # the checkpoint's file: what mexit does not implement was named at load and
            # is not applied (the file keeps it: save_pretrained writes it back)
            from transformers import GenerationConfig

            config.update(**{k: getattr(GenerationConfig(), k) for k, v in self.not_applied.items()
                             if getattr(config, k, None) == v})
        unused = config.update(**kwargs)
        if unused:
            raise TypeError(f"generate() got unsupported arguments: {sorted(unused)}")
        for name, off in OFF.items():
            if name in ("dola_layers", "stop_strings", "output_hidden_states"):  # generate's own
                continue
            value = getattr(config, name, None)
            if value is not None and value not in off:
                raise NotImplementedError(f"{name}={value!r} is not supported by mexit's generate (greedy and "
                                          "sampling with temperature / top-k / top-p; speculative= for assisted "
                                          "decoding)")
        return config

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, streamer=None, speculative=None, logits_processor=None,
                 stopping_criteria=None, tokenizer=None, **kwargs):
        """transformers' signature; returns a [B, T + new] tensor (or an object with `.sequences` when
        return_dict_in_generate=True). speculative=SpeculativeConfig(...) decodes the configured mode
        self-speculatively: the same greedy output, the same sampling distribution. dola_layers="low" | "high" |
        [layers] decodes with DoLa as transformers 4.51.3 did, one premature layer for the whole batch (its rule;
        the native API picks one per row). repetition_penalty and no_repeat_ngram_size count each row's own tokens:
        transformers also counts a left-padded row's padding ids.

        logits_processor: transformers' RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor and the
        Temperature / TopK / TopP warpers run as mexit's own settings (every engine, the same tokens); any other
        processor is refused by class name. stopping_criteria: transformers' StoppingCriteria (its own or a
        caller's) are called after every token with the sequences so far [B, T] (finished rows padded, as
        transformers pads them) and scores=None; stop_strings (with `tokenizer`, else the checkpoint's) through
        transformers' StopStringCriteria; either costs one host read per step. output_hidden_states with
        return_dict_in_generate: per step, per layer (embeddings first, the last after ln_f) states as
        transformers returns them, from one forward pass over the output (a fixed mode's states; without
        return_dict_in_generate transformers ignores the flag, and so does the drop-in)."""
        inputs = kwargs.pop("inputs", None)  # transformers' name for the first argument
        if inputs is not None and input_ids is not None:
            raise ValueError("pass the prompt ids once: as inputs or as input_ids")
        input_ids = input_ids if input_ids is not None else inputs
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        input_ids, attention_mask = check_ids(input_ids, attention_mask, self.lm.config.vocab_size)
        return_dict = kwargs.pop("return_dict_in_generate", None)
        want_scores, want_logits = kwargs.pop("output_scores", None), kwargs.pop("output_logits", None)
        dola_layers = kwargs.pop("dola_layers", None)
        want_hidden = kwargs.pop("output_hidden_states", None)
        stop_strings = kwargs.pop("stop_strings", None)
        cfg = self._settings(generation_config, kwargs)
        want_hidden = getattr(cfg, "output_hidden_states", False) if want_hidden is None else want_hidden
        stop_strings = getattr(cfg, "stop_strings", None) if stop_strings is None else stop_strings
        processed = processor_settings(logits_processor, cfg)
        dola_layers = dola_layers if dola_layers is not None else getattr(cfg, "dola_layers", None)
        if dola_layers is not None and not isinstance(dola_layers, (str, list, tuple)):
            raise ValueError(f"dola_layers must be 'low', 'high' or a list of layers, got {dola_layers!r}")
        if dola_layers is not None and speculative is not None:
            raise ValueError("dola_layers and speculative= choose different decoding: pass one")
        decode = self.decode if dola_layers is None else DolaConfig(dola_layers, per_batch=True)
        return_dict = cfg.return_dict_in_generate if return_dict is None else return_dict
        want_scores = cfg.output_scores if want_scores is None else want_scores
        want_logits = getattr(cfg, "output_logits", False) if want_logits is None else want_logits
        eos = plain(stop_ids_in_vocabulary(cfg.eos_token_id, self.lm.config.vocab_size,
                                           passed="eos_token_id" in kwargs))
        stops = [eos] if isinstance(eos, int) else list(eos or [])
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else stops[0] if stops else 0
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(self.device).bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if (~mask[:, -1]).any():
            warnings.warn("right-padded input: decoder-only generation expects left padding; each row is "
                          "continued from its last unmasked token", stacklevel=2)
        prompts = [row[m].tolist() for row, m in zip(input_ids, mask)]
        if cfg.max_new_tokens is not None:
            max_new = plain(cfg.max_new_tokens)
        elif cfg.max_length is not None:  # set by the caller or the checkpoint: the total length
            max_new = cfg.max_length - input_ids.shape[1]
            if max_new < 1:
                raise ValueError(f"nothing to generate: max_length {cfg.max_length} <= input length "
                                 f"{input_ids.shape[1]}")
        else:
            max_new = TRANSFORMERS_MAX_NEW_TOKENS
        on_token = None
        if streamer is not None:
            streamer.put(input_ids.cpu())
            on_token = lambda tokens: streamer.put(tokens.cpu())  # noqa: E731
        p = {"repetition_penalty": cfg.repetition_penalty, "no_repeat_ngram_size": cfg.no_repeat_ngram_size,
             "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, **processed}
        sampling = SamplingConfig(do_sample=bool(cfg.do_sample), top_p_after_top_k=True,
                                  repetition_penalty=first(p["repetition_penalty"], 1.0),
                                  no_repeat_ngram_size=first(p["no_repeat_ngram_size"], 0),
                                  temperature=first(p["temperature"], 1.0) if cfg.do_sample else 1.0,
                                  top_k=first(p["top_k"], 50) if cfg.do_sample else 0,
                                  top_p=first(p["top_p"], 1.0) if cfg.do_sample else 1.0)
        keep = bool(return_dict and (want_scores or want_logits))
        if keep and speculative is not None:
            raise NotImplementedError("output_scores / output_logits with speculative=: mexit keeps the logits of one "
                                      "fixed pass per token (decode without speculative= to keep them)")
        if keep and (dola_layers is not None or sampling.controls_repetition or processed):
            raise NotImplementedError("output_scores / output_logits with DoLa, the repetition controls or a "
                                      "logits_processor list: mexit keeps one kind of logits per step, not "
                                      "transformers' raw and processed pair")
        criteria = list(stopping_criteria or [])
        if stop_strings is not None:
            from transformers import StopStringCriteria

            tokenizer = tokenizer if tokenizer is not None else self.lm.tokenizer
            if tokenizer is None:
                raise ValueError("stop_strings needs a tokenizer: pass generate(..., tokenizer=tokenizer)")
            criteria.append(StopStringCriteria(tokenizer, stop_strings))
        stop = criteria_rule(criteria, input_ids, pad, stops) if criteria else None
        result = self.lm.generate(prompts, max_new, decode=decode, eos_token_id=stops, on_token=on_token,
                                  keep_logits=keep, speculative=speculative, sampling=sampling, stop=stop)
        if streamer is not None:
            streamer.end()
        width = max(len(row) for row in result.tokens)
        new = torch.full((len(prompts), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for b, row in enumerate(result.tokens):
            new[b, : len(row)] = torch.tensor(row, dtype=input_ids.dtype)
        sequences = torch.cat([input_ids, new], dim=1)
        if return_dict:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            extra = {}
            if want_logits:
                extra["logits"] = tuple(result.logits)
            if want_scores:
                extra["scores"] = tuple(warp(z, sampling) for z in result.logits)
            if want_hidden:
                extra["hidden_states"] = self.step_hidden_states(sequences, attention_mask, input_ids.shape[1])
            return GenerateDecoderOnlyOutput(sequences=sequences, **extra)
        return sequences

    def step_hidden_states(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, prompt_len: int) -> tuple:
        """transformers' generate hidden_states: per new token, per layer ([B, prompt_len, d] for the first, then
        [B, 1, d]), from one forward pass over the sequences but their last token."""
        width = sequences.shape[1]
        mask = torch.cat([prompt_mask.to(self.device).long(),
                          torch.ones(len(sequences), width - prompt_len, dtype=torch.long, device=self.device)], 1)
        states = self(sequences[:, :-1], attention_mask=mask[:, :-1], output_hidden_states=True).hidden_states
        return (tuple(h[:, :prompt_len] for h in states),
                *(tuple(h[:, t - 1: t] for h in states) for t in range(prompt_len + 1, width)))

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                 return_dict: bool | None = None, **kwargs):
        """transformers' GPT-2 output (`CausalLMOutputWithCrossAttentions`: attributes, indexing, `to_tuple`; with
        return_dict=False its tuple): logits [B, T, V] (fp32) of the configured mode at every position; with labels
        [B, T] (-100: ignored), the mean next-token cross-entropy as `.loss`, as transformers computes it (labels
        shifted inside); output_hidden_states: `.hidden_states`, n_layer + 1 tensors [B, T, d] as transformers' GPT-2
        returns them (the embeddings, each block's output, the last after ln_f). No cache is returned
        (past_key_values None; use_cache=True is refused). Left padding only: positions count from each row's first
        token. Errors: NotImplementedError naming an argument set to other than its off value; ValueError for ids
        outside the vocabulary or longer than the context."""
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

        unsupported = {k: v for k, v in kwargs.items() if not unset(v)}
        if unsupported:
            raise NotImplementedError(f"forward arguments not supported by mexit: {sorted(unsupported)}")
        input_ids, attention_mask = check_ids(input_ids, attention_mask, self.lm.config.vocab_size)
        context, longest = self.lm.config.n_positions, input_ids.shape[1]
        if attention_mask is not None:  # positions count from each row's first token: padding takes none
            longest = int(torch.as_tensor(attention_mask).bool().sum(1).max())
        if longest > context:
            raise ValueError(f"input_ids holds a row of {longest} tokens: the model's context is {context}")
        model = self.lm.model
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        mask = mask.to(self.device)
        if (~mask).any() and bool((~mask[:, -1]).any()):
            raise NotImplementedError("forward on right-padded input: mexit's forward takes left padding")
        logits, states = teacher_forced(model, self.decode, input_ids, mask, every_layer=bool(output_hidden_states))
        loss = None
        if labels is not None:
            labels = torch.where(mask, labels.to(self.device), -100)  # padding never counts
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        hidden_states = None
        if output_hidden_states:
            n = model.config.n_layer
            hidden_states = (*(states[layer] for layer in range(n)), model.final_norm(states[n]))
        out = CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, hidden_states=hidden_states)
        return out if return_dict is None or return_dict else out.to_tuple()

    forward = __call__


def check_ids(input_ids, attention_mask, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A [batch, length] id tensor (numpy arrays too), its mask's shape, at least one row, one position and one
    unmasked token per row, and every unmasked id inside the vocabulary. Returns (ids, mask) as tensors."""
    if isinstance(input_ids, np.ndarray):
        input_ids = torch.from_numpy(input_ids)
    if isinstance(attention_mask, np.ndarray):
        attention_mask = torch.from_numpy(attention_mask)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D tensor [batch, length], got {shape} (add a batch dimension: "
                         "ids[None])")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    rows, length = input_ids.shape
    if rows == 0 or length == 0:
        raise ValueError(f"input_ids of shape {(rows, length)} holds no token: every row needs at least one (start "
                         "from the tokenizer's bos_token_id to generate from nothing)")
    if attention_mask is not None:
        empty = (~attention_mask.bool()).all(dim=1).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask rows {empty[:10]} are all zeros: those rows hold no token (every row "
                             "needs at least one unmasked token)")
    used = input_ids if attention_mask is None else input_ids[attention_mask.to(input_ids.device).bool()]
    bad = used[(used < 0) | (used >= vocab_size)]
    if len(bad):
        raise ValueError(f"token ids {sorted(set(bad.tolist()))[:10]} are outside the vocabulary "
                         f"0..{vocab_size - 1}")
    return input_ids, attention_mask


# transformers' logits processors the drop-in runs as mexit's own settings: class -> (setting, its attribute)
PROCESSORS = {"RepetitionPenaltyLogitsProcessor": ("repetition_penalty", "penalty"),
              "NoRepeatNGramLogitsProcessor": ("no_repeat_ngram_size", "ngram_size"),
              "TemperatureLogitsWarper": ("temperature", "temperature"),
              "TopKLogitsWarper": ("top_k", "top_k"), "TopPLogitsWarper": ("top_p", "top_p")}
NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def processor_settings(processors, cfg) -> dict:
    """A LogitsProcessorList of transformers' own processors as mexit settings ({setting: value}); any other class,
    a warper with a non-default filter_value / min_tokens_to_keep, or a processor that the generation config also
    sets (transformers refuses that too) is an error naming it."""
    settings = {}
    for proc in processors or ():
        name = type(proc).__name__
        if name not in PROCESSORS or not type(proc).__module__.startswith("transformers."):
            raise NotImplementedError(f"logits_processor {name} is not supported by mexit's generate: it runs "
                                      f"transformers' {', '.join(PROCESSORS)} as its own settings (set the others' "
                                      "effect through mexit's modes, or use transformers' generate)")
        if getattr(proc, "filter_value", float("-inf")) != float("-inf") or getattr(proc, "min_tokens_to_keep", 1) != 1:
            raise NotImplementedError(f"logits_processor {name} with filter_value / min_tokens_to_keep other than "
                                      "their defaults is not supported by mexit's generate")
        setting, attribute = PROCESSORS[name]
        configured = getattr(cfg, setting, None)
        sampling_only = setting in ("temperature", "top_k", "top_p")
        if setting in settings or (configured not in (None, NEUTRAL[setting])
                                   and (cfg.do_sample or not sampling_only)):
            raise ValueError(f"logits_processor {name} given while {setting} is also set (generation config or "
                             "arguments): pass one")
        settings[setting] = plain(getattr(proc, attribute))
    return settings


def criteria_rule(criteria, input_ids: torch.Tensor, pad: int, stops: list[int]):
    """transformers' stopping criteria as a stop rule (`mexit.decoding.stopping.StopWatch`): each criterion gets the
    sequences so far [B, T] (the prompt as given, then the new tokens; after a row's stop id, pad_token_id as
    transformers pads finished rows) and scores=None."""
    prompt = input_ids.cpu()
    stop_ids = torch.tensor(stops, dtype=torch.long)

    def ends(tokens: list[list[int]]) -> list[bool]:
        new = torch.tensor(tokens, dtype=torch.long)
        hit = torch.isin(new, stop_ids).long()
        new = new.masked_fill(hit.cumsum(-1) - hit > 0, pad)
        ids = torch.cat([prompt, new.to(prompt.dtype)], 1)
        done = torch.zeros(len(tokens), dtype=torch.bool)
        for criterion in criteria:
            done |= torch.as_tensor(criterion(ids, None), dtype=torch.bool).cpu().expand(len(tokens))
        return done.tolist()

    return ends


def warp(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The scores mexit's sampler draws from: logits / temperature with tokens outside top-k / top-p at -inf
    (greedy: the logits unchanged, as transformers' scores without logits processors)."""
    if not sampling.do_sample:
        return logits
    scores = logits.float() / sampling.temperature
    return scores.masked_fill(~kept_tokens(scores.softmax(-1), sampling), float("-inf"))


class AutoMultiExitModel:
    """autocontrastive-gen's entry point: `AutoMultiExitModel.from_pretrained(path, multi_exit_config=...)`."""

    @staticmethod
    def from_pretrained(path_or_id, multi_exit_config: MultiExitConfiguration | None = None,
                        **kwargs) -> FastMultiExitModel:
        return FastMultiExitModel.from_pretrained(path_or_id, multi_exit_config=multi_exit_config, **kwargs)
