"""A once-per-device check that every Triton kernel compiles for this card and agrees with its reference on a
small problem; `backend="auto"` falls back to the torch path with a warning when one does not."""

from __future__ import annotations

import functools

import torch

from .catalog import KERNELS


@functools.cache
def probe_kernels(device: torch.device) -> str | None:
    """None when every kernel the catalog probes always (`catalog.KERNELS`) matches its reference on `device`, else
    what failed (compilation errors too)."""
    for kernel in KERNELS:
        problem = kernel.probed == "always" and probe(kernel.op, device)
        if problem:
            return problem
    return None


@functools.cache
def probe_gemv(device: torch.device) -> str | None:
    """None when the loop-free GEMV block linear matches its reference on `device`, else what failed: asked only
    where the GEMV is chosen (a card's route or the user), so that a failure there turns it off, not the kernels."""
    return probe("fused_gemv", device)


def probe(op: str, device: torch.device) -> str | None:
    """Run the probe case of kernel `op` on `device`: None when it matches its reference, else what failed."""
    try:
        return CASES[op](device, torch.Generator(device=device).manual_seed(0))
    except Exception as err:  # compilation or launch failure: report it, fall back
        return f"{op}: {type(err).__name__}: {err}"[:200]


def _close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.allclose(ours.float(), ref.float(), atol=2e-2, rtol=1e-2)


def _two_heads(device, gen):
    """The exit stage of two heads over two rows (d 64, vocabulary 300): (kernel output, fp32 reference output)."""
    from mexit.kernels.exit_head import exit_head
    from mexit.kernels.exit_head_ref import exit_head_ref

    hidden = torch.randn(2, 2, 64, device=device, generator=gen).half()
    ones, zeros = torch.ones(64, device=device).half(), torch.zeros(64, device=device).half()
    heads = [torch.randn(300, 64, device=device, generator=gen).half() for _ in range(2)]
    out = exit_head(hidden, ones, zeros, 1e-5, heads)
    return out, exit_head_ref(hidden.float(), ones.float(), zeros.float(), 1e-5, [h.float() for h in heads])


def _exit_head(device, gen) -> str | None:
    out, ref = _two_heads(device, gen)
    ok = torch.allclose(out.logits, ref.logits, atol=5e-2, rtol=1e-2)
    return None if ok else "exit_head disagrees with its reference"


def _acd_contrast(device, gen) -> str | None:
    from mexit.kernels.acd_contrast import acd_contrast
    from mexit.kernels.acd_contrast_ref import acd_contrast_ref

    out, _ = _two_heads(device, gen)
    token, _ = acd_contrast(out.logits, out.lse)
    ok = torch.equal(token, acd_contrast_ref(out.logits[0], out.logits[1]).argmax(-1))
    return None if ok else "acd_contrast disagrees with its reference"


def _linear(kernel, name: str, device, gen) -> str | None:
    from mexit.kernels.fused_linear_ref import fused_linear_ref

    x = torch.randn(2, 64, device=device, generator=gen).half()
    w = (torch.randn(96, 64, device=device, generator=gen) / 8).half()  # [N, K]
    b = torch.randn(96, device=device, generator=gen).half()
    ln = (torch.ones(64, device=device).half(), torch.zeros(64, device=device).half(), 1e-5)
    y = kernel(x, w, b, ln=ln, gelu=True)
    want = fused_linear_ref(x.float(), w.float(), b.float(), ln=(ln[0].float(), ln[1].float(), 1e-5), gelu=True)
    return None if _close(y, want) else f"{name} disagrees with its reference"


def _fused_linear(device, gen) -> str | None:
    from mexit.kernels.fused_linear import fused_linear

    return _linear(fused_linear, "fused_linear", device, gen)


def _fused_gemv(device, gen) -> str | None:
    from mexit.kernels.fused_gemv import fused_gemv

    return _linear(fused_gemv, "fused_gemv", device, gen)


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


def _control_repetition(device, gen) -> str | None:
    """Two rows with repeats, the penalty and a 2-gram ban: bit for bit the reference's."""
    from mexit.kernels.control_repetition import control_repetition
    from mexit.kernels.control_repetition_ref import control_repetition_ref

    scores = torch.randn(2, 300, device=device, generator=gen)
    history = torch.tensor([[5, 7, 5, 7, 9, 5], [1, 2, 3, 1, 2, 3]], device=device)
    last = torch.tensor([5, 4], device=device)
    same = torch.equal(control_repetition(scores, history, last, 1.3, 2),
                       control_repetition_ref(scores, history, last, 1.3, 2))
    return None if same else "control_repetition disagrees with its reference"


def _check_states(device, gen) -> str | None:
    """Three rows' states at one slot, one of them holding inf: the same health marks as the reference."""
    from mexit.kernels.check_states import check_states
    from mexit.kernels.check_states_ref import check_states_ref

    h = torch.randn(3, 1, 64, device=device, generator=gen).half()
    h[1, 0, 7] = float("inf")
    valid = torch.ones(3, 8, dtype=torch.bool, device=device)
    slot = torch.tensor([5], device=device)
    ours, ref = torch.zeros(3, 8, device=device), torch.zeros(3, 8, device=device)
    check_states(h, ours, valid, slot)
    check_states_ref(h, ref, valid, slot)
    return None if torch.equal(ours.isnan(), ref.isnan()) and ours[1, 5].isnan() else \
        "check_states disagrees with its reference"


def _round_epilogue(device, gen) -> str | None:
    """A round of four rows (kept drafts, one cut at a stop id, one at the budget, one finished before): the same
    state and result as the reference."""
    from mexit.kernels.round_epilogue import round_epilogue
    from mexit.kernels.round_epilogue_ref import round_epilogue_ref
    from mexit.kernels.step_epilogue_ref import StepIO, stop_ids

    def state() -> dict:
        def t(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=device)

        io = StepIO(tokens=t([0] * 4), positions=t([20, 30, 40, 50]), finished=t([0, 0, 0, 1], torch.bool),
                    eos=stop_ids((2,), device), out=torch.full((4, 8), -5, device=device), step=t([0]), slot=t([10]),
                    arrivals=t([0], torch.int32), wte=torch.zeros(4, 3, device=device),
                    wpe=torch.zeros(4, 3, device=device), h0=torch.zeros(4, 3, device=device))
        return dict(accepted=t([2, 2, 1, 0]), token=t([7, 8, 3, 1]), drafts=t([[5, 6], [2, 9], [5, 6], [7, 7]]),
                    n_drafts=t([2, 2, 2, 0]), draft_i=t([2]), count=t([1, 1, 3, 2]),
                    drafted=torch.zeros(4, 8, dtype=torch.bool, device=device), io=io,
                    valid=torch.zeros(4, 16, dtype=torch.bool, device=device))

    ours, ref = state(), state()
    same = torch.equal(round_epilogue(**ours, max_new_tokens=4), round_epilogue_ref(**ref, max_new_tokens=4))
    same = same and all(torch.equal(ours[k], ref[k]) for k in ours if k != "io")
    same = same and all(torch.equal(getattr(ours["io"], k), getattr(ref["io"], k)) for k in vars(ref["io"]))
    return None if same else "round_epilogue disagrees with its reference"


CASES = {"exit_head": _exit_head, "acd_contrast": _acd_contrast, "fused_linear": _fused_linear,
         "fused_gemv": _fused_gemv, "decode_attention": _decode_attention, "exit_decide": _exit_decide,
         "propagate_kv": _propagate_kv, "step_epilogue": _step_epilogue, "control_repetition": _control_repetition,
         "check_states": _check_states, "round_epilogue": _round_epilogue}  # one probe case per kernel of the catalog
