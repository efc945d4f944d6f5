"""The exit stage: layernorm + head projection + softmax statistics (+ ACD contrast), through the Triton kernels
or their PyTorch references. `resolve_backend` picks which; every result says which one ran."""

from __future__ import annotations

import functools
import os
import warnings

import torch

from mexit.kernels.acd_contrast_ref import acd_contrast_ref
from mexit.kernels.exit_head_ref import ExitHeadOutput, exit_head_ref

from .config import DecodeConfig
from .model import MultiExitGPT2

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
        raise RuntimeError("backend 'triton' was asked for but triton is not installed (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend 'triton' on CPU needs TRITON_INTERPRET=1 in the environment before start")
    return "triton"


@functools.cache
def probe_kernels(device: torch.device) -> str | None:
    """Compile and run the kernels (exit head, ACD contrast, fused linear, decode attention, exit decision) once
    per device and process on a small problem; None when they match the references, else why."""
    try:
        from mexit.kernels.acd_contrast import acd_contrast
        from mexit.kernels.decode_attention import decode_attention
        from mexit.kernels.decode_attention_ref import decode_attention_ref
        from mexit.kernels.exit_head import exit_head
        from mexit.kernels.fused_linear import fused_linear
        from mexit.kernels.fused_linear_ref import fused_linear_ref

        gen = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(2, 2, 64, device=device, generator=gen).half()
        ones, zeros = torch.ones(64, device=device).half(), torch.zeros(64, device=device).half()
        heads = [torch.randn(300, 64, device=device, generator=gen).half() for _ in range(2)]
        out = exit_head(hidden, ones, zeros, 1e-5, heads)
        ref = exit_head_ref(hidden.float(), ones.float(), zeros.float(), 1e-5, [h.float() for h in heads])
        token, _ = acd_contrast(out.logits, out.lse)
        if not torch.allclose(out.logits, ref.logits, atol=5e-2, rtol=1e-2):
            return "exit_head disagrees with its reference"
        if not torch.equal(token, acd_contrast_ref(out.logits[0], out.logits[1]).argmax(-1)):
            return "acd_contrast disagrees with its reference"
        x, w, b = hidden[0], heads[0][:64] / 8, heads[1][0]  # [2, 64], [64, 64], [64]
        y = fused_linear(x, w, b, ln=(ones, zeros, 1e-5), gelu=True, residual=x)
        want = fused_linear_ref(x.float(), w.float(), b.float(), ln=(ones.float(), zeros.float(), 1e-5), gelu=True,
                                residual=x.float())
        if not torch.allclose(y.float(), want, atol=2e-2, rtol=1e-2):
            return "fused_linear disagrees with its reference"
        cache = torch.randn(2, 2, 2, 128, 32, device=device, generator=gen).half()  # k|v, B=2, H=2, T=128
        valid = torch.arange(128, device=device).expand(2, 128) <= 70  # slots up to the current one
        slot = torch.tensor([70], device=device)
        y = decode_attention(hidden[0].repeat(1, 3)[:, :192], cache[0], cache[1], valid, slot)
        want = decode_attention_ref(hidden[0].repeat(1, 3)[:, :192].float(), cache[0].float(), cache[1].float(),
                                    valid, slot)
        if not torch.allclose(y.float(), want, atol=2e-2, rtol=1e-2):
            return "decode_attention disagrees with its reference"
        problem = _probe_exit_decide(device)
        if problem:
            return problem
    except Exception as err:  # compilation or launch failure: report it, fall back
        return f"{type(err).__name__}: {err}"[:200]
    return None


def _probe_exit_decide(device: torch.device) -> str | None:
    from mexit.kernels.exit_decide import exit_decide
    from mexit.kernels.exit_decide_ref import exit_decide_ref

    def state():
        return [torch.tensor([0.2, 0.9, 0.7], device=device), torch.full((4,), 0.5, device=device),
                torch.tensor([1], device=device), torch.tensor([True, True, False], device=device),
                torch.zeros(3, dtype=torch.bool, device=device), torch.tensor([4, 5, 6], device=device),
                torch.zeros(3, dtype=torch.long, device=device), torch.ones(3, 64, device=device).half(),
                torch.zeros(3, 64, device=device).half(), torch.zeros(3, 4, dtype=torch.long, device=device),
                torch.zeros(3, 4, device=device), torch.zeros(2, dtype=torch.bool, device=device)]

    ours, ref = state(), state()
    exit_decide(3, *ours)
    exit_decide_ref(3, *ref)
    if not all(torch.equal(a, b) for a, b in zip(ours, ref)):
        return "exit_decide disagrees with its reference"
    return None


def exit_stage(model: MultiExitGPT2, hidden: torch.Tensor, heads: list, backend: str,
               with_logprobs: bool = False, skip: torch.Tensor | None = None) -> ExitHeadOutput:
    """hidden: [E, B, d] raw block outputs h_L (ln_f is applied here), heads: E head names. skip (triton only):
    a [1] device flag; while set, the head is not read and the outputs are left unwritten."""
    c, w = model.config, model.w
    weights = [model.head_weight(head) for head in heads]
    if backend == "triton":
        from mexit.kernels.exit_head import exit_head

        return exit_head(hidden, w.ln_f_w, w.ln_f_b, c.layer_norm_epsilon, weights, with_logprobs=with_logprobs,
                         skip=skip)
    if skip is not None:
        raise ValueError("a skip flag needs the triton backend (the torch head cannot read a device flag)")
    return exit_head_ref(hidden, w.ln_f_w, w.ln_f_b, c.layer_norm_epsilon, weights, with_logprobs=with_logprobs)


def next_token_distribution(model: MultiExitGPT2, decode: DecodeConfig, hidden: torch.Tensor, backend: str,
                            need_scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden: [E, B, d] for `decode.heads()`. Returns the greedy token [B] and, if asked, the [B, V] fp32
    log-distribution the mode defines (log-softmax of the head, or ACD's log q) for sampling."""
    heads = decode.heads()
    if decode.mode != "contrast":
        out = exit_stage(model, hidden, heads, backend, with_logprobs=need_scores)
        return out.argmax[0], (out.logprobs[0] if need_scores else None)
    out = exit_stage(model, hidden, heads, backend)
    if backend == "triton":
        from mexit.kernels.acd_contrast import acd_contrast

        return acd_contrast(out.logits, out.lse, decode.alpha, decode.min_candidates, with_logprobs=need_scores)
    log_q = acd_contrast_ref(out.logits[0], out.logits[1], decode.alpha, decode.min_candidates)
    return log_q.argmax(-1), (log_q if need_scores else None)
