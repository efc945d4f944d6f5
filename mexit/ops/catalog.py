"""The kernels, one row per op of `mexit.ops`: what the backend probe checks on a card (`probe.py`), what the AOT
compile must compile (`mexit.bench.aot_compile` and its test) and which tests the GPU script runs
(`python -m mexit.ops.catalog tests`). A kernel's files follow from its op: `kernels/{op}.py` (the Triton
launcher), its reference, `tests/test_{op}.py`, `bench/bench_{op}.py` where it has one."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    """op: the name of its `mexit.ops` function and `kernels/` module; reference: the `kernels/*_ref` module whose
    function defines its result; programs: the Triton programs it launches; probed: "always" (every card the triton
    backend starts on) or "chosen" (only where a route or the user picks it: the GEMV); pdl: it launches with
    programmatic dependent launch when asked; prefetch: it reads weights, issued before the PDL wait."""

    op: str
    reference: str
    programs: tuple[str, ...]
    probed: str = "always"
    pdl: bool = True
    prefetch: bool = False

    @property
    def test(self) -> str:
        return f"tests/test_{self.op}.py"


KERNELS = (
    Kernel("exit_head", "exit_head_ref", ("_exit_head_tiles", "_exit_head_merge"), prefetch=True),
    Kernel("acd_contrast", "acd_contrast_ref", ("_acd_tiles", "_acd_merge")),
    Kernel("fused_linear", "fused_linear_ref", ("_fused_linear",), prefetch=True),
    Kernel("fused_gemv", "fused_linear_ref", ("_fused_gemv",), probed="chosen", prefetch=True),
    Kernel("decode_attention", "decode_attention_ref", ("_decode_attention", "_decode_attention_merge")),
    Kernel("exit_decide", "exit_decide_ref", ("_exit_decide",)),
    Kernel("propagate_kv", "propagate_kv_ref", ("_propagate_kv",), prefetch=True),
    Kernel("step_epilogue", "step_epilogue_ref", ("_step_epilogue",)),
    Kernel("control_repetition", "control_repetition_ref", ("_control_repetition",), pdl=False),
    Kernel("check_states", "check_states_ref", ("_check_states",)),
    Kernel("round_epilogue", "round_epilogue_ref", ("_round_epilogue",), pdl=False),
)


def programs() -> set[str]:
    """Every Triton program the kernels launch."""
    return {p for kernel in KERNELS for p in kernel.programs}


def prefetching() -> set[str]:
    """The programs whose weight loads go before the PDL wait (the first of a weight-reading kernel's programs)."""
    return {kernel.programs[0] for kernel in KERNELS if kernel.prefetch}


if __name__ == "__main__":  # the kernels' test files, for the GPU script: `tests`, or `tests always` (the kernels
    # probed on every card; the GEMV's tests run in their own step)
    if sys.argv[1:2] != ["tests"] or sys.argv[2:] not in ([], ["always"]):
        print("usage: python -m mexit.ops.catalog tests [always]", file=sys.stderr)
        sys.exit(2)
    print(" ".join(kernel.test for kernel in KERNELS if sys.argv[2:] != ["always"] or kernel.probed == "always"))
