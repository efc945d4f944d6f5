"""The exit stage: layernorm + head projection + softmax statistics (+ ACD contrast), through the Triton kernels
or their PyTorch references. `resolve_backend` picks which; every result says which one ran."""

from __future__ import annotations

import os
import warnings

import torch

from mexit.kernels.acd_contrast_ref import acd_contrast_ref
from mexit.kernels.exit_head_ref import ExitHeadOutput, exit_head_ref
from mexit.kernels.step_epilogue_ref import StepIO

from .config import DecodeConfig
from .model import MultiExitGPT2
from .probe import probe_kernels

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> triton on CUDA when triton imports and the kernels compile and agree with their references on a
    small probe, else torch with a warning. "triton" on CPU needs TRITON_INTERPRET=1 set before triton was
    imported."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if not triton_available():
            warnings.warn("triton is not installed: the exit stage runs on the PyTorch reference path (slower)",
                          stacklevel=3)
            return "torch"
        problem = probe_kernels(device)
        if problem:
            warnings.warn(f"the Triton exit-stage kernels failed a probe on {device} ({problem}): using the PyTorch "
                          "reference path (slower)", stacklevel=3)
            return "torch"
        return "triton"
    if not triton_available():
        raise ValueError("backend 'triton' was asked for but triton is not installed (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU needs TRITON_INTERPRET=1 in the environment before start")
    return "triton"


def exit_stage(model: MultiExitGPT2, hidden, heads: list, backend: str, with_logprobs: bool = False,
               skip: torch.Tensor | None = None, emit: StepIO | None = None, pdl: bool = False) -> ExitHeadOutput:
    """hidden: [E, B, d] or E tensors [B, d], raw block outputs h_L (ln_f is applied here), heads: E head names.
    Triton only: skip, a [1] device flag: while set, the head is not read and the outputs are left unwritten;
    emit (one head): the kernel also emits each row's argmax as the decode step's token and sets the next step up
    (`step_epilogue_ref`); pdl: programmatic dependent launch."""
    c, w = model.config, model.w
    weights = [model.head_weight(head) for head in heads]
    if backend == "triton":
        from mexit.kernels.exit_head import exit_head

        return exit_head(hidden, w.ln_f_w, w.ln_f_b, c.layer_norm_epsilon, weights, with_logprobs=with_logprobs,
                         skip=skip, emit=emit, pdl=pdl)
    if skip is not None or emit is not None:
        raise ValueError("a skip flag or an in-kernel emit needs the triton backend")
    return exit_head_ref(hidden, w.ln_f_w, w.ln_f_b, c.layer_norm_epsilon, weights, with_logprobs=with_logprobs)


def next_token_distribution(model: MultiExitGPT2, decode: DecodeConfig, hidden, backend: str, need_scores: bool,
                            emit: StepIO | None = None, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden: [E, B, d] or E tensors [B, d] for `decode.heads()`. Returns the greedy token [B] and, if asked, the
    [B, V] fp32 log-distribution the mode defines (log-softmax of the head, or ACD's log q) for sampling.
    Triton only: emit, the last kernel also emits the greedy token as the decode step's (`step_epilogue_ref`);
    pdl: programmatic dependent launch."""
    heads = decode.heads()
    if decode.mode != "contrast":
        out = exit_stage(model, hidden, heads, backend, with_logprobs=need_scores, emit=emit, pdl=pdl)
        return out.argmax[0], (out.logprobs[0] if need_scores else None)
    out = exit_stage(model, hidden, heads, backend, pdl=pdl)
    if backend == "triton":
        from mexit.kernels.acd_contrast import acd_contrast

        return acd_contrast(out.logits, out.lse, decode.alpha, decode.min_candidates, with_logprobs=need_scores,
                            max_logit=out.max_logit, emit=emit, pdl=pdl)
    if emit is not None:
        raise ValueError("an in-kernel emit needs the triton backend")
    log_q = acd_contrast_ref(out.logits[0], out.logits[1], decode.alpha, decode.min_candidates)
    return log_q.argmax(-1), (log_q if need_scores else None)


def mode_logits(model: MultiExitGPT2, decode: DecodeConfig, hidden: torch.Tensor, backend: str) -> torch.Tensor:
    """[B, V] fp32 "logits" of the mode for hidden [E, B, d]: the head's logits, or ACD's log q."""
    out = exit_stage(model, hidden, decode.heads(), backend)
    if decode.mode != "contrast":
        return out.logits[0].float()
    return acd_contrast_ref(out.logits[0], out.logits[1], decode.alpha, decode.min_candidates).float()
