"""The static decode engine: build (and, on the graph engine, capture) the static step of a mode once per
batch and length bucket, then run a generation through it with one eos flag read every EOS_CHECK_EVERY steps."""

from __future__ import annotations

import warnings

import torch

from .early_exit import ExitPolicy
from .fast import StaticStep
from .fast_early_exit import PredicatedEarlyExit, StaticEarlyExit
from .generation import GenerationResult, check_prompts, cut_at_eos, left_pad
from .model import MultiExitGPT2
from .sampling import SamplingConfig, row_uniforms
from .static_state import StepKey, batch_bucket, length_bucket

EOS_CHECK_EVERY = 16


def generate_static(steps: dict, model: MultiExitGPT2, prompts, mode, max_new_tokens: int,
                    sampling: SamplingConfig, eos: int | None, backend: str, engine: str,
                    on_token=None, compile_layers: bool = False, pdl: bool = False) -> GenerationResult:
    """Generate through the static step of `mode` (a DecodeConfig, or an ExitPolicy: early exit), taken from
    `steps` or built (and, on the graph engine, captured) on first use. Rows are padded to the batch bucket
    with copies of the first prompt; seeded sampling draws the same uniform numbers, in the same order, as the
    eager loop (`row_uniforms`). The host replays steps and reads one eos flag every EOS_CHECK_EVERY steps. pdl: the
    step's kernels use programmatic dependent launch (triton backend)."""
    early_exit = isinstance(mode, ExitPolicy)
    if early_exit:
        mode.checked_exits(model.config)
    else:
        mode.validate_for(model.config)
    prompts = check_prompts(prompts, model.config, max_new_tokens)
    rows = len(prompts)
    bucket = batch_bucket(rows)
    padded = left_pad(prompts + [prompts[0]] * (bucket - rows), model.device)
    length = length_bucket(padded.ids.shape[1] + max_new_tokens, model.config.n_positions)
    key = StepKey(mode, sampling.do_sample, sampling.temperature, sampling.top_k, sampling.top_p, bucket, length,
                  pdl and backend == "triton")
    state = steps.get(key)
    if state is None:
        if compile_layers and backend == "triton":
            warnings.warn("compile=True applies to the torch layer path; the triton backend's decode blocks are "
                          "already fused kernels: not compiling (use backend='torch' to compile)", stacklevel=3)
            compile_layers = False
        kind = StaticStep
        if early_exit:
            kind = PredicatedEarlyExit if mode.schedule == "predicated" else StaticEarlyExit
        state = steps[key] = kind(model, key, backend, compile_layers)
        if engine == "graph":
            try:
                state.capture()
            except Exception as err:  # keep generating: the same step, replayed without a graph
                warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); running the static step "
                              "without a graph", stacklevel=3)
                state.graphs = {}
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
    if engine == "graph" and not state.graphs:
        engine = "static"  # what actually runs
    uniform = None
    if sampling.do_sample:  # the eager loop's numbers: one stream per row (filler rows draw nothing)
        uniform = torch.zeros(max_new_tokens, bucket, device=model.device)
        uniform[:, :rows] = row_uniforms(sampling.seed, rows, max_new_tokens, model.device)
    if early_exit:
        state.prefill(padded, rows, eos, uniform, [mode.threshold_at(i, max_new_tokens) for i in range(max_new_tokens)])
    else:
        state.prefill(padded, rows, eos, uniform)
    if on_token is not None:
        on_token(state.tokens[:rows])
    produced = 1
    for i in range(1, max_new_tokens):
        if eos is not None and i % EOS_CHECK_EVERY == 0 and bool(state.finished.all()):
            break
        state.advance()
        produced += 1
        if on_token is not None:
            on_token(state.tokens[:rows])
    tokens = cut_at_eos(state.out[:rows, :produced].tolist(), eos)
    result = GenerationResult(tokens=tokens, backend=backend, engine=engine)
    if early_exit:
        state.describe(result, rows, produced)
    return result
