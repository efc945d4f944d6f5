"""A checkpoint folder's generation settings and tokenizer: `generation_config.json` through transformers'
GenerationConfig (which fields mexit applies, which change nothing, which it refuses unless off) and the tokenizer
files. Below the front ends, so data-set runs and Ray drivers read them without loading a model."""

from __future__ import annotations

import warnings

TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
# Every field of transformers' GenerationConfig is applied, inert (changes nothing mexit computes), or refused by name
# unless it holds one of its "off" values (tests/test_compat.py enumerates the installed transformers' fields). The
# native API takes the applied fields of a checkpoint's generation_config.json as its defaults (pad_token_id and the
# output_* fields only matter to the drop-in).
NATIVE_DEFAULTS = ("max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                   "repetition_penalty", "no_repeat_ngram_size")
APPLIED = NATIVE_DEFAULTS + ("pad_token_id", "return_dict_in_generate", "output_scores", "output_logits")
INERT = ("_from_model_config", "_commit_hash", "transformers_version", "bos_token_id", "decoder_start_token_id",
         "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
         "low_memory", "prefill_chunk_size", "continuous_batching_config", "is_assistant", "early_stopping",
         "length_penalty", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
         "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size", "assistant_ensemble_weight")
OFF = {"num_beams": (1,), "num_beam_groups": (1,), "num_return_sequences": (1,), "diversity_penalty": (0.0,),
       "penalty_alpha": (0.0,), "encoder_repetition_penalty": (1.0,),
       "encoder_no_repeat_ngram_size": (0,), "min_length": (0,), "min_new_tokens": (0,),
       "bad_words_ids": (), "force_words_ids": (), "constraints": (), "suppress_tokens": (),
       "begin_suppress_tokens": (), "forced_bos_token_id": (), "forced_eos_token_id": (), "sequence_bias": (),
       "guidance_scale": (1.0,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
       "min_p": (0.0,), "top_h": (), "exponential_decay_length_penalty": (), "renormalize_logits": (False,),
       "remove_invalid_values": (False,), "output_attentions": (False,), "output_hidden_states": (False,),
       "stop_strings": (), "max_time": (), "watermarking_config": (), "prompt_lookup_num_tokens": (),
       "assistant_early_exit": (), "speculation_type": (), "use_mtp": (False,), "token_healing": (False,),
       "dola_layers": ()}
DEFAULT_MAX_NEW_TOKENS = 32
# the types of the fields the native API applies (an id list for eos_token_id)
INTEGER = ("max_length", "max_new_tokens", "top_k", "no_repeat_ngram_size")
NUMBER = ("temperature", "top_p", "repetition_penalty")


def load_tokenizer(folder):
    """transformers' AutoTokenizer from the checkpoint folder, or None when the folder has no tokenizer files."""
    if folder is None or not any((folder / name).exists() for name in TOKENIZER_MARKERS):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def read_generation_config(folder):
    """transformers' GenerationConfig of a checkpoint folder's `generation_config.json`, or None without one.
    ValueError naming the file when transformers cannot read it (a field of the wrong type, broken JSON)."""
    if folder is None or not (folder / "generation_config.json").exists():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except (TypeError, ValueError, OSError) as err:
        raise ValueError(f"{folder / 'generation_config.json'} cannot be read: {' '.join(str(err).split())[:300]} "
                         "(fix or remove the file: its fields are generate()'s defaults)") from None


def generation_defaults(generation_config, warn: bool = True) -> dict:
    """The fields a checkpoint's generation_config.json sets that the native API applies as defaults; the fields it
    sets that mexit does not implement (away from their off values) are named once, here."""
    if generation_config is None:
        return {}
    given = {k: v for k, v in generation_config.to_diff_dict().items() if v is not None}
    ignored = unimplemented(generation_config)
    if ignored and warn:
        warnings.warn(f"generation_config.json sets {', '.join(f'{k}={v!r}' for k, v in sorted(ignored.items()))}, "
                      "which mexit does not implement: those fields are not applied", stacklevel=3)
    applied = {k: v for k, v in given.items() if k in NATIVE_DEFAULTS}
    for k, v in applied.items():
        kind = _wrong_type(k, v)
        if kind:
            raise ValueError(f"generation_config.json: {k} must be {kind}, got {v!r} (fix or remove the field: the "
                             "file's fields are generate()'s defaults)")
    return applied


def unimplemented(generation_config) -> dict:
    """{field: value} of a GenerationConfig's fields set away from their off values that mexit does not implement
    (neither applied nor inert)."""
    given = {k: v for k, v in generation_config.to_diff_dict().items() if v is not None}
    return {k: v for k, v in given.items() if k not in APPLIED + INERT and v not in OFF.get(k, ())}


def _wrong_type(name: str, value) -> str | None:
    """What an applied field must be where `value` is not that, else None."""
    integer = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if name == "do_sample":
        return None if isinstance(value, bool) else "true or false"
    if name == "eos_token_id":
        return None if integer(value) or isinstance(value, list) and all(map(integer, value)) else \
            "an integer or a list of them"
    if name in NUMBER:
        return None if integer(value) or isinstance(value, float) else "a number"
    return None if integer(value) else "an integer"
