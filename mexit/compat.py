"""Drop-in front ends: transformers-style `generate` and autocontrastive-gen's `AutoMultiExitModel`.

    model = AutoMultiExitModel.from_pretrained(path, multi_exit_config=MultiExitConfiguration(
        use_original_head=False, contrast_layer_indices=("original", 12)))
    output_ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32)   # like transformers

Outputs follow transformers: prompt + new tokens in one tensor; a row that produced eos is padded with
pad_token_id (eos when unset) until every row has finished or max_new_tokens is reached. `model(input_ids)`
returns `.logits` of the configured head (ACD's log q in contrast mode) at every position, as
autocontrastive-gen's forward does.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from .config import DecodeConfig, MultiExitConfiguration
from .generation import Decoder, left_pad
from .heads import exit_stage
from .runtime import MultiExitLM, decode_config

# transformers' defaults for fields a GenerationConfig leaves unset (transformers 5 stores None for them)
DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
               "min_new_tokens": None, "min_length": 0, "penalty_alpha": None, "num_beam_groups": 1}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor


class FastMultiExitModel:
    """A multi-exit GPT-2 with a fixed decoding mode and transformers' generate signature."""

    def __init__(self, lm: MultiExitLM, decode: DecodeConfig, generation_config=None):
        from transformers import GenerationConfig

        decode.validate_for(lm.config)
        self.lm, self.decode = lm, decode
        self.config = lm.config.to_hf()
        self.generation_config = generation_config or GenerationConfig.from_model_config(self.config)

    @classmethod
    def from_pretrained(cls, path_or_id, multi_exit_config: MultiExitConfiguration | None = None, dtype=None,
                        device=None, backend="auto", engine="auto", **mode) -> FastMultiExitModel:
        from transformers import GenerationConfig

        from .checkpoint import resolve_device

        device = resolve_device(device)
        dtype = dtype or ("fp16" if device.type == "cuda" else "fp32")
        lm = MultiExitLM.from_pretrained(path_or_id, dtype=dtype, device=device, backend=backend, engine=engine)
        if mode and multi_exit_config is not None:
            raise ValueError("pass either multi_exit_config or mexit's mode arguments, not both")
        decode = decode_config(**mode) if mode else (multi_exit_config or MultiExitConfiguration()).to_decode_config()
        gen_config = None
        if (lm.model.folder / "generation_config.json").exists():
            gen_config = GenerationConfig.from_pretrained(lm.model.folder)
        return cls(lm, decode, gen_config)

    @property
    def device(self) -> torch.device:
        return self.lm.model.device

    def _settings(self, generation_config, kwargs) -> object:
        config = copy.deepcopy(generation_config or self.generation_config)
        unused = config.update(**kwargs)
        if unused:
            raise TypeError(f"generate() got unsupported arguments: {sorted(unused)}")
        for name, default in DEFAULTS.items():
            if getattr(config, name, None) is None:
                setattr(config, name, default)
        for name, default in UNSUPPORTED.items():
            value = getattr(config, name, default)
            if value is not None and value != default:
                raise NotImplementedError(f"{name}={value} is not supported by mexit's generate (greedy and "
                                          "sampling with temperature / top-k / top-p only)")
        return config

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, streamer=None, **kwargs):
        """transformers' signature; returns a [B, T + new] tensor (or an object with `.sequences` when
        return_dict_in_generate=True)."""
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        return_dict = kwargs.pop("return_dict_in_generate", False)
        cfg = self._settings(generation_config, kwargs)
        eos = cfg.eos_token_id
        if isinstance(eos, (list, tuple)):
            if len(set(eos)) > 1:
                raise NotImplementedError("several eos_token_ids are not supported; pass one")
            eos = eos[0] if eos else None
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
        if pad is None:
            pad = 0
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
        max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - input_ids.shape[1]
        if max_new < 1:
            raise ValueError(f"nothing to generate: max_length {cfg.max_length} <= input length {input_ids.shape[1]}")
        on_token = None
        if streamer is not None:
            streamer.put(input_ids.cpu())
            on_token = lambda tokens: streamer.put(tokens.cpu())  # noqa: E731
        sampling = dict(do_sample=bool(cfg.do_sample), temperature=cfg.temperature if cfg.do_sample else 1.0,
                        top_k=(cfg.top_k or 0) if cfg.do_sample else 0, top_p=cfg.top_p if cfg.do_sample else 1.0)
        result = self.lm.generate(prompts, max_new, decode=self.decode, eos_token_id=eos, on_token=on_token,
                                  **sampling)
        if streamer is not None:
            streamer.end()
        width = max(len(row) for row in result.tokens)
        new = torch.full((len(prompts), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for b, row in enumerate(result.tokens):
            new[b, : len(row)] = torch.tensor(row, dtype=input_ids.dtype)
        sequences = torch.cat([input_ids, new], dim=1)
        if return_dict:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits [B, T, V] (fp32) of the configured mode at every position."""
        model = self.lm.model
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        prompts = [row[m].tolist() for row, m in zip(input_ids, mask.to(self.device))]
        batch = left_pad(prompts, self.device)
        decoder = Decoder(model, batch, 1)
        h, _ = decoder.prefill_input()
        b, t, d = h.shape
        layers = [model.config.n_layer if head == "original" else head for head in self.decode.heads()]
        states = model.run_to(h, layers, decoder.cache, 0)
        hidden = torch.stack([states[layer].reshape(b * t, d) for layer in layers])
        out = exit_stage(model, hidden, self.decode.heads(), "torch")
        if self.decode.mode == "contrast":
            from mexit.kernels.acd_contrast_ref import acd_contrast_ref

            logits = acd_contrast_ref(out.logits[0], out.logits[1], self.decode.alpha, self.decode.min_candidates)
        else:
            logits = out.logits[0]
        return CausalLMOutput(logits=logits.view(b, t, -1))


class AutoMultiExitModel:
    """autocontrastive-gen's entry point: `AutoMultiExitModel.from_pretrained(path, multi_exit_config=...)`."""

    @staticmethod
    def from_pretrained(path_or_id, multi_exit_config: MultiExitConfiguration | None = None,
                        **kwargs) -> FastMultiExitModel:
        return FastMultiExitModel.from_pretrained(path_or_id, multi_exit_config=multi_exit_config, **kwargs)
