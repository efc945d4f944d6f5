"""The one generate loop: prompts, the engine's prefill, a step per token until the budget or every row's end,
streaming, and the result with its statistics. Every mode runs through it on every engine."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .decoding.prompts import check_prompts
from .decoding.sampling import SamplingConfig, row_uniforms
from .decoding.stopping import StopWatch
from .ops import Backend
from .values import plain

if TYPE_CHECKING:
    from .decoding.step import Mode
    from .model.decoder import MultiExitGPT2


@dataclass
class GenerationResult:
    """tokens[b]: the new token ids of row b (ending at and including eos when it was produced).
    `backend` says which ops ran (torch / triton), `engine` which engine (eager / static / graph); `exit_layers`
    and `confidences` (per row and token) are filled by early exit, `premature_layers` (per row and token: the layer
    contrasted with) by DoLa; `stats` uses `mexit.decoding.stats`' names."""

    tokens: list[list[int]]
    backend: str
    engine: str = "eager"
    text: list[str] | None = None
    exit_layers: list[list[int]] | None = None
    confidences: list[list[float]] | None = None
    premature_layers: list[list[int]] | None = None
    stats: dict = field(default_factory=dict)
    cache: object = None  # the KVCache of the real rows after generation, when asked for (tests, inspection)
    logits: list | None = None  # every step's [B, V] fp32 logits of the mode (ACD: log q), when asked for
    drafted: list[list[bool]] | None = None  # speculative: per token, drafted and accepted (else the target's)
    seed: int | tuple | None = None  # sampling: the seed used (drawn when none was given)
    nonfinite: dict = field(default_factory=dict)  # {row: first output token whose states held NaN / inf}


class NonFiniteStates(RuntimeWarning):
    """A generation computed hidden states holding NaN or inf (an overflow, typically of fp16 activations): the
    affected rows' tokens from that step on are not the model's prediction. `GenerationResult.nonfinite` names
    them."""


def generate(model: MultiExitGPT2, prompts, mode: Mode, engine, backend: Backend, max_new_tokens: int,
             sampling: SamplingConfig, eos, on_token=None, return_cache: bool = False,
             keep_logits: bool = False, stop=None) -> GenerationResult:
    """Generate `max_new_tokens` per prompt (token ids) in `mode` (built by `mexit.decoding.modes.build`) on
    `engine`, stopping a row at any of the stop ids `eos` (None, an id, or a sequence of at most 8). on_token(tokens
    [B]) gets the tokens of every position (a device tensor: reading it waits for the step; rows that have finished
    read eos); with stop ids it is not called again once every row has finished. return_cache keeps the real rows'
    KV cache; keep_logits every step's [B, V] logits (fixed modes; DoLa: its scores). Seeded sampling gives each row
    its own random stream, so a row samples the same tokens alone and in any batch, on every engine. stop: a
    host-side stop rule (`mexit.decoding.stopping.StopWatch`: stop strings, transformers' stopping criteria), read
    after every position; it costs a host read per step."""
    prompts = check_prompts(prompts, model.config, max_new_tokens)
    max_new_tokens = int(max_new_tokens)
    eos = stop_tuple(eos)
    if keep_logits and not mode.keeps_logits:
        raise NotImplementedError("keep_logits with early exit or speculative decoding: the logits are not those "
                                  "of one fixed pass per token")
    rows = len(prompts)
    uniform = row_uniforms(sampling.seed, rows, mode.streams_needed(max_new_tokens), model.device) \
        if sampling.do_sample else None
    state = engine.start(model, backend, mode, mode.settings, prompts, sampling, eos, max_new_tokens, uniform,
                         mode.thresholds(max_new_tokens), keep_logits)
    mode = state.mode  # a static engine's step keeps the mode object it was built with
    watch = None if stop is None else StopWatch(stop, rows, eos, on_token)
    sink = on_token if watch is None else watch
    streamed = 0 if sink is None else mode.stream(state, sink, 0)
    check_every = 1 if sink is not None else engine.check_every  # a finished row streams nothing more
    while (watch is None or not watch.all_ended()) and mode.more(state, check_every):
        state.advance()
        if sink is not None:
            streamed = mode.stream(state, sink, streamed)
    tokens = cut_at_eos(mode.tokens(state), eos)
    result = GenerationResult(tokens=tokens if watch is None else watch.cut(tokens), backend=backend.name,
                              engine=state.engine)
    state.describe(result)
    result.nonfinite = state.nonfinite([len(row) for row in result.tokens])
    if result.nonfinite:
        where = ", ".join(f"row {row} from token {j}" for row, j in list(result.nonfinite.items())[:8])
        dtype = str(model.dtype).removeprefix("torch.")
        cause = "an activation overflowed float16 (run in fp32 or bf16) or " if dtype == "float16" else ""
        warnings.warn(NonFiniteStates(
            f"non-finite hidden states (NaN or inf) in {len(result.nonfinite)} of {rows} rows: {where}; those tokens "
            f"are not the model's prediction ({cause}the weights hold NaN or inf: loaded without the weight check? "
            "result.nonfinite holds every row)"), stacklevel=3)
    if keep_logits:
        result.logits = list(state.kept[: state.decoded + 1, :rows].clone())
    if return_cache:
        result.cache = state.returned_cache()
    return result


def cut_at_eos(table: list[list[int]], eos: tuple[int, ...] | None) -> list[list[int]]:
    """Each row up to and including its first stop id."""
    if eos is None:
        return table
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in table]


def stop_ids_in_vocabulary(eos, vocab_size: int, passed: bool):
    """Stop ids a row can produce: a caller's id outside the vocabulary is refused (ValueError naming it); a
    checkpoint's (transformers' GPT-2 default 50256 in a smaller vocabulary) is dropped with a warning, as
    transformers only warns."""
    ids = stop_tuple(eos) or ()
    outside = [i for i in ids if i >= vocab_size]
    if outside and passed:
        raise ValueError(f"eos_token_id {outside[0]} is outside the vocabulary 0..{vocab_size - 1}: no row could "
                         "ever produce it")
    if outside:
        warnings.warn(f"the checkpoint's eos_token_id {outside[0]} is outside its vocabulary 0..{vocab_size - 1}: "
                      "no row can produce it, so it stops nothing", stacklevel=3)
        return [i for i in ids if i < vocab_size] or None
    return eos


def stop_tuple(eos) -> tuple[int, ...] | None:
    """Stop ids as given (None, an id, or a sequence of ids) as a tuple of ints, or None for none."""
    eos = plain(eos)
    if eos is None:
        return None
    ids = (eos,) if isinstance(eos, int) else tuple(eos)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
    return ids or None
