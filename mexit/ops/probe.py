"""A once-per-device check that every Triton kernel compiles for this card and agrees with its reference on a
small problem; `backend="auto"` falls back to the torch path with a warning when one does not."""

from __future__ import annotations

import functools

import torch


@functools.cache
def probe_kernels(device: torch.device) -> str | None:
    """None when every kernel matches its reference on `device`, else what failed (compilation errors too)."""
    for probe in (_exit_stage, _fused_linear, _decode_attention, _exit_decide, _propagate_kv, _step_epilogue):
        try:
            problem = probe(device, torch.Generator(device=device).manual_seed(0))
        except Exception as err:  # compilation or launch failure: report it, fall back
            return f"{probe.__name__.strip('_')}: {type(err).__name__}: {err}"[:200]
        if problem:
            return problem
    return None


@functools.cache
def probe_gemv(device: torch.device) -> str | None:
    """None when the loop-free GEMV block linear matches its reference on `device`, else what failed: asked only
    where the GEMV is chosen (a card's route or the user), so that a failure there turns it off, not the kernels."""
    try:
        return _fused_gemv(device, torch.Generator(device=device).manual_seed(0))
    except Exception as err:  # compilation or launch failure
        return f"fused_gemv: {type(err).__name__}: {err}"[:200]


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(ours.float(), ref.float(), atol=2e-2, rtol=1e-2)


def _exit_stage(device, gen) -> str | None:
    from mexit.kernels.acd_contrast import acd_contrast
    from mexit.kernels.acd_contrast_ref import acd_contrast_ref
    from mexit.kernels.exit_head import exit_head
    from mexit.kernels.exit_head_ref import exit_head_ref

    hidden = torch.randn(2, 2, 64, device=device, generator=gen).half()
    ones, zeros = torch.ones(64, device=device).half(), torch.zeros(64, device=device).half()
    heads = [torch.randn(300, 64, device=device, generator=gen).half() for _ in range(2)]
    out = exit_head(hidden, ones, zeros, 1e-5, heads)
    ref = exit_head_ref(hidden.float(), ones.float(), zeros.float(), 1e-5, [h.float() for h in heads])
    if not torch.allclose(out.logits, ref.logits, atol=5e-2, rtol=1e-2):
        return "exit_head disagrees with its reference"
    token, _ = acd_contrast(out.logits, out.lse)
    if not torch.equal(token, acd_contrast_ref(out.logits[0], out.logits[1]).argmax(-1)):
        return "acd_contrast disagrees with its reference"
    return None


def _linear(kernel, device, gen) -> str | None:
    from mexit.kernels.fused_linear_ref import fused_linear_ref

    x = torch.randn(2, 64, device=device, generator=gen).half()
    w = (torch.randn(96, 64, device=device, generator=gen) / 8).half()  # [N, K]
    b = torch.randn(96, device=device, generator=gen).half()
    ln = (torch.ones(64, device=device).half(), torch.zeros(64, device=device).half(), 1e-5)
    y = kernel(x, w, b, ln=ln, gelu=True)
    want = fused_linear_ref(x.float(), w.float(), b.float(), ln=(ln[0].float(), ln[1].float(), 1e-5), gelu=True)
    return None if _close(y, want) else f"{kernel.__name__} disagrees with its reference"


def _fused_linear(device, gen) -> str | None:
    from mexit.kernels.fused_linear import fused_linear

    return _linear(fused_linear, device, gen)


def _fused_gemv(device, gen) -> str | None:
    from mexit.kernels.fused_gemv import fused_gemv

    return _linear(fused_gemv, device, gen)


def _decode_attention(device, gen) -> str | None:
    from mexit.kernels.decode_attention import decode_attention
    from mexit.kernels.decode_attention_ref import decode_attention_ref

    qkv = torch.randn(2, 192, device=device, generator=gen).half()  # B=2, H=2, head size 32
    cache = torch.randn(2, 2, 2, 128, 32, device=device, generator=gen).half()  # k|v, T=128
    valid = torch.arange(128, device=device).expand(2, 128) <= 70  # slots up to the current one
    slot = torch.tensor([70], device=device)
    want = decode_attention_ref(qkv.float(), cache[0].float(), cache[1].float(), valid, slot)
    for splits in (1, 2):  # one launch, and flash-decoding splits with their merge
        y = decode_attention(qkv, cache[0], cache[1], valid, slot, splits=splits)
        if not _close(y, want):
            return f"decode_attention ({splits} split) disagrees with its reference"
    return None


def _exit_decide(device, gen) -> str | None:
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
    return None if all(map(torch.equal, ours, ref)) else "exit_decide disagrees with its reference"


def _propagate_kv(device, gen) -> str | None:
    from mexit.kernels.propagate_kv import propagate_kv
    from mexit.kernels.propagate_kv_ref import propagate_kv_ref

    L, d = 3, 64
    weights = [torch.ones(L, d, device=device).half(), torch.zeros(L, d, device=device).half(),
               (torch.randn(L, 3 * d, d, device=device, generator=gen) / 8).half(),
               torch.randn(L, 3 * d, device=device, generator=gen).half()]
    h = torch.randn(2, d, device=device, generator=gen).half()
    rows, slots = torch.tensor([0, 1], device=device), torch.tensor([5, 9], device=device)
    ours = torch.zeros(2, L, 2, 2, 16, 32, device=device).half()  # k|v, [L, B=2, H=2, T=16, 32]
    ref = ours.float()
    propagate_kv(h, *weights, ours[0], ours[1], rows, slots, 1, 3, 1e-5)
    propagate_kv_ref(h.float(), *(w.float() for w in weights), ref[0], ref[1], rows, slots, 1, 3, 1e-5)
    return None if _close(ours, ref) else "propagate_kv disagrees with its reference"


def _step_epilogue(device, gen) -> str | None:
    """Three rows (one finished, one emitting eos) through the step epilogue, alone and in the exit stage's merge:
    the same state as the reference, twice (the arrival count must come back to zero)."""
    from mexit.kernels.exit_head import exit_head
    from mexit.kernels.step_epilogue import step_epilogue
    from mexit.kernels.step_epilogue_ref import StepIO, step_epilogue_ref, stop_ids

    def state():
        return StepIO(tokens=torch.zeros(3, dtype=torch.long, device=device),
                      positions=torch.tensor([4, 7, 9], device=device),
                      finished=torch.tensor([False, True, False], device=device),
                      eos=stop_ids((2, 4), device), out=torch.zeros(3, 8, dtype=torch.long, device=device),
                      step=torch.tensor([1], device=device), slot=torch.tensor([9], device=device),
                      arrivals=torch.zeros(1, dtype=torch.int32, device=device),
                      wte=torch.arange(16 * 64, device=device).view(16, 64).half(),
                      wpe=torch.ones(32, 64, device=device).half(), h0=torch.zeros(3, 64, device=device).half())

    ours, ref = state(), state()
    token = torch.tensor([5, 6, 2], device=device)
    hidden = torch.randn(3, 64, device=device, generator=gen).half()
    head = torch.randn(16, 64, device=device, generator=gen).half()
    ones, zeros = torch.ones(64, device=device).half(), torch.zeros(64, device=device).half()
    step_epilogue(token, ours)
    step_epilogue_ref(token, ref)
    argmax = exit_head([hidden], ones, zeros, 1e-5, [head], emit=ours).argmax[0]
    step_epilogue_ref(argmax, ref)
    same = all(torch.equal(getattr(ours, name), getattr(ref, name)) for name in vars(ref))
    return None if same else "step_epilogue disagrees with its reference"
