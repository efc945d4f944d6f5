"""One dispatch point for the kernels: each op runs its Triton kernel (`mexit.kernels`) or its PyTorch `*_ref`,
chosen here from a `Backend` and nowhere else. Both give the same function; an option only one of them offers
(a device skip flag) raises a named error on the other. Every tensor stays on its device: no op reads a value
into Python, so any of them can be captured in a CUDA graph.

Kernel modules import triton, so they are imported only when the triton backend runs them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mexit.kernels.acd_contrast_ref import acd_contrast_ref
from mexit.kernels.check_states_ref import check_states_ref
from mexit.kernels.control_repetition_ref import control_repetition_ref
from mexit.kernels.exit_decide_ref import exit_decide_ref
from mexit.kernels.exit_decide_ref import probe_confidence as probe_confidence  # re-exported: the layers above
from mexit.kernels.exit_head_ref import ExitHeadOutput, exit_head_ref
from mexit.kernels.fused_linear_ref import fused_linear_ref
from mexit.kernels.propagate_kv_ref import propagate_kv_ref
from mexit.kernels.round_epilogue_ref import round_epilogue_ref
from mexit.kernels.step_epilogue_ref import StepIO, step_epilogue_ref
from mexit.kernels.step_epilogue_ref import stop_ids as stop_ids  # re-exported: the layers above

# Decode batches up to this many rows run the tiled fused-linear kernel on the triton backend; larger ones cuBLAS
# matmuls (torch) around the decode-attention kernel. The dataclass default runs the kernels wherever they can
# (the tests' and the interpreter's choice); what a CUDA user gets by default follows the measured ranking of the
# card (`routes.py`): on the H200, cuBLAS + the attention kernel beat the tiled block at batch 1 and 64.
FUSED_MAX_ROWS = 64
GEMV_MAX_ROWS = 8  # the loop-free kernel holds at most this many rows


@dataclass(frozen=True)
class Backend:
    """How ops run. name: "torch" (the references) or "triton" (the kernels; on CPU under TRITON_INTERPRET=1).
    The block linears on triton: up to `gemv_max_rows` rows (<= 8; 0: never) the loop-free GEMV kernel
    (`fused_gemv`), else up to `fused_max_rows` rows the tiled kernel (`fused_linear`), else cuBLAS; a skip flag
    needs a kernel at any size (GEMV where the rows allow it, else tiled).
    pdl: triton only, kernels launch with programmatic dependent launch (Hopper or newer, compiled).
    Hashable: a static decode step is built for one Backend (it is part of the step key)."""

    name: str = "torch"
    fused_max_rows: int = FUSED_MAX_ROWS
    pdl: bool = False
    gemv_max_rows: int = 0

    def __post_init__(self):
        if self.name not in ("torch", "triton"):
            raise ValueError(f"unknown backend {self.name!r}; use torch or triton")
        if self.fused_max_rows < 0:
            raise ValueError(f"fused_max_rows must be >= 0, got {self.fused_max_rows}")
        if not 0 <= self.gemv_max_rows <= GEMV_MAX_ROWS:
            raise ValueError(f"gemv_max_rows must be in 0..{GEMV_MAX_ROWS}, got {self.gemv_max_rows}")
        if self.pdl and self.name != "triton":
            raise ValueError("pdl needs the triton backend")
        if self.gemv_max_rows and self.name != "triton":
            raise ValueError("gemv_max_rows needs the triton backend")

    @property
    def triton(self) -> bool:
        return self.name == "triton"

    def linear_kernel(self, rows: int, skip: bool = False) -> str:
        """Which implementation runs a block linear of `rows` rows: "gemv", "fused" (tiled) or "cublas"."""
        if not self.triton:
            return "cublas"
        if rows <= self.gemv_max_rows or (skip and rows <= GEMV_MAX_ROWS and self.gemv_max_rows):
            return "gemv"
        return "fused" if rows <= self.fused_max_rows or skip else "cublas"


TORCH = Backend()
# the block-linear paths a benchmark compares by name: Backend settings of each
LINEAR_PATHS = {"cublas": dict(fused_max_rows=0, gemv_max_rows=0),
                "tiled": dict(fused_max_rows=FUSED_MAX_ROWS, gemv_max_rows=0),
                "gemv": dict(fused_max_rows=0, gemv_max_rows=GEMV_MAX_ROWS)}


def _needs_triton(backend: Backend, what: str) -> None:
    if not backend.triton:
        raise ValueError(f"{what} needs the triton backend (the kernels read it on the device)")


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: Backend = TORCH,
                 ln: tuple[torch.Tensor, torch.Tensor, float] | None = None, gelu: bool = False,
                 residual: torch.Tensor | None = None, live: torch.Tensor | None = None,
                 skip: torch.Tensor | None = None, skip_cols: int | None = None) -> torch.Tensor:
    """y = residual + gelu(layer_norm(x) @ weight.T + bias) [M, N]; rows where `live` is False get the residual.
    x [M, K], weight [N, K] (nn.Linear layout), bias [N], ln (w [K], b [K], eps), residual [M, N], live [M] bool.
    On triton the kernel `backend.linear_kernel` names (a skip flag, [1] int32 on the device: every row frozen,
    columns below skip_cols not computed, needs one)."""
    if skip is not None:
        _needs_triton(backend, "a skip flag")
    kernel = backend.linear_kernel(x.shape[0], skip is not None)
    if kernel == "gemv":
        from mexit.kernels.fused_gemv import fused_gemv

        return fused_gemv(x, weight, bias, ln=ln, gelu=gelu, residual=residual, live=live, skip=skip,
                          skip_cols=skip_cols, pdl=backend.pdl)
    if kernel == "fused":
        from mexit.kernels.fused_linear import fused_linear as tiled

        return tiled(x, weight, bias, ln=ln, gelu=gelu, residual=residual, live=live, skip=skip,
                     skip_cols=skip_cols, pdl=backend.pdl)
    return fused_linear_ref(x, weight, bias, ln=ln, gelu=gelu, residual=residual, live=live)


def decode_attention(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: torch.Tensor,
                     slot: torch.Tensor, backend: Backend = TORCH, skip: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """One new position per row at cache slot `slot` ([1] int64): writes its key/value, marks the slot valid and
    attends over the valid slots. qkv [B, 3d], cache_k / cache_v [B, H, T, hd], valid [B, T] bool -> y [B, d].
    skip ([1] int32, triton only): while set, only the key/value is written (state propagation)."""
    if skip is not None:
        _needs_triton(backend, "a skip flag")
    if backend.triton:
        from mexit.kernels.decode_attention import decode_attention as kernel

        return kernel(qkv, cache_k, cache_v, valid, slot, skip=skip, scale=scale, pdl=backend.pdl)
    from mexit.kernels.decode_attention_ref import decode_attention_ref

    return decode_attention_ref(qkv, cache_k, cache_v, valid, slot, scale=scale)


def propagate_kv(h: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, attn_w: torch.Tensor,
                 attn_b: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, rows: torch.Tensor,
                 slots: torch.Tensor, start: int, end: int, eps: float, backend: Backend = TORCH) -> None:
    """State propagation: keys/values of blocks start..end-1 for positions (rows[i], slots[i]) from the exited
    states h [N, d], K_j, V_j = c_attn_j(ln_1_j(h))[k, v], into cache_k / cache_v [L, B, H, T, hd] (CALM)."""
    if start >= end or h.shape[0] == 0:
        return
    args = (h, ln_w, ln_b, attn_w, attn_b, cache_k, cache_v, rows, slots, start, end, eps)
    if backend.triton:
        from mexit.kernels.propagate_kv import propagate_kv as kernel

        kernel(*args, pdl=backend.pdl)
    else:
        propagate_kv_ref(*args)


def exit_head(hidden: torch.Tensor | Sequence[torch.Tensor], ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
              heads: list[torch.Tensor], backend: Backend = TORCH, with_logprobs: bool = False,
              skip: torch.Tensor | None = None, emit: StepIO | None = None) -> ExitHeadOutput:
    """The exit stage: logits[e] = heads[e] @ ln_f(hidden[e]) with softmax statistics (fp32). hidden [E, B, d] or
    E tensors [B, d] (E = 1 or 2 on triton), heads E x [V, d]. skip ([1] int32, triton only): while set, nothing
    is read or written. emit (one head): each row's argmax ends the decode step (`step_epilogue_ref`)."""
    if skip is not None:
        _needs_triton(backend, "a skip flag")
    if backend.triton:
        from mexit.kernels.exit_head import exit_head as kernel

        return kernel(hidden, ln_w, ln_b, eps, heads, with_logprobs=with_logprobs, skip=skip, emit=emit,
                      pdl=backend.pdl)
    out = exit_head_ref(hidden, ln_w, ln_b, eps, heads, with_logprobs=with_logprobs)
    if emit is not None:
        step_epilogue_ref(out.argmax[0], emit)
    return out


def acd_contrast(out: ExitHeadOutput, alpha: float, min_candidates: int, backend: Backend = TORCH,
                 with_logprobs: bool = False, emit: StepIO | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Autocontrastive Decoding (Gera et al. 2023, as autocontrastive-gen computes it) of the exit stage's two heads
    (upper first): the greedy token [B] int64 and, if asked, log q [B, V] fp32. emit: the token ends the decode step
    (`step_epilogue_ref`)."""
    if backend.triton:
        from mexit.kernels.acd_contrast import acd_contrast as kernel

        return kernel(out.logits, out.lse, alpha, min_candidates, with_logprobs=with_logprobs,
                      max_logit=out.max_logit, emit=emit, pdl=backend.pdl)
    log_q = acd_contrast_ref(out.logits[0], out.logits[1], alpha, min_candidates)
    token = log_q.argmax(-1)
    if emit is not None:
        step_epilogue_ref(token, emit)
    return token, (log_q if with_logprobs else None)


def exit_decide(layer: int, confidence: torch.Tensor, thresholds: torch.Tensor, step: torch.Tensor,
                running: torch.Tensor, fired: torch.Tensor, candidate: torch.Tensor | None, chosen: torch.Tensor,
                h_last: torch.Tensor | None, h_exit: torch.Tensor, exit_at: torch.Tensor, conf_at: torch.Tensor,
                flags: torch.Tensor, backend: Backend = TORCH, skip: torch.Tensor | None = None,
                fired_none: torch.Tensor | None = None, final: bool = False, emit: StepIO | None = None,
                arrivals: torch.Tensor | None = None, probe: tuple | None = None) -> None:
    """The exit decision at `layer` for every row, in place (see `exit_decide_ref` for the tensors; probe: a learned
    exit predictor that computes the confidence from h_last)."""
    args = (layer, confidence, thresholds, step, running, fired, candidate, chosen, h_last, h_exit, exit_at, conf_at,
            flags, skip, fired_none)
    if backend.triton:
        from mexit.kernels.exit_decide import exit_decide as kernel

        kernel(*args, final=final, emit=emit, arrivals=arrivals, probe=probe, pdl=backend.pdl)
    else:
        exit_decide_ref(*args, final=final, emit=emit, probe=probe)


def control_repetition(scores: torch.Tensor, history: torch.Tensor, last: torch.Tensor, penalty: float, ngram: int,
                       backend: Backend = TORCH) -> torch.Tensor:
    """A mode's scores after the repetition penalty and the n-gram ban (`control_repetition_ref`): one kernel on
    triton."""
    if backend.triton:
        from mexit.kernels.control_repetition import control_repetition as kernel

        return kernel(scores, history, last, penalty, ngram)
    return control_repetition_ref(scores, history, last, penalty, ngram)


def check_states(h: torch.Tensor, health: torch.Tensor, valid: torch.Tensor, slot, rows: torch.Tensor | None = None,
                 backend: Backend = TORCH) -> None:
    """Mark the cache slots of tokens whose new states h [b, S, d] hold a NaN or an infinity (`check_states_ref`):
    one kernel on triton."""
    if backend.triton:
        from mexit.kernels.check_states import check_states as kernel

        kernel(h, health, valid, slot, rows, pdl=backend.pdl)
    else:
        check_states_ref(h, health, valid, slot, rows)


def step_epilogue(token: torch.Tensor, io: StepIO, backend: Backend = TORCH) -> None:
    """End a decode step with `token` [B] int64: eos masking, the output column, the next step's input embedding,
    position, slot and step index (`step_epilogue_ref`)."""
    if backend.triton:
        from mexit.kernels.step_epilogue import step_epilogue as kernel

        kernel(token, io, pdl=backend.pdl)
    else:
        step_epilogue_ref(token, io)


def round_epilogue(accepted: torch.Tensor, token: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor,
                   draft_i: torch.Tensor, count: torch.Tensor, drafted: torch.Tensor, io: StepIO, valid: torch.Tensor,
                   max_new_tokens: int, backend: Backend = TORCH) -> torch.Tensor:
    """End a speculative round: the rows' kept tokens, their cache slots, the next round's state
    (`round_epilogue_ref`): one kernel on triton. Returns was_finished [B] bool."""
    args = (accepted, token, drafts, n_drafts, draft_i, count, drafted, io, valid, max_new_tokens)
    if backend.triton:
        from mexit.kernels.round_epilogue import round_epilogue as kernel

        return kernel(*args)
    return round_epilogue_ref(*args)
