"""The kernel catalog (mexit/ops/catalog.py) is complete and what reads it uses it: every Triton program a kernel
module launches is in exactly one row, each row's module, reference, test and probe case exist, and the backend
probe catches a wrong kernel of every row it probes (the repetition controls and the state check included)."""

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

from mexit.ops import probe
from mexit.ops.catalog import KERNELS, programs

ROOT = Path(__file__).resolve().parents[1]


def launched_programs() -> dict[str, str]:
    """{program: kernels/ module} of every `_program[grid](...)` launch in kernels/."""
    found = {}
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name):
                found[node.func.value.id] = path.stem
    return found


def test_every_launched_program_is_in_one_row_of_its_module():
    launched = launched_programs()
    assert set(launched) == programs()
    listed = [p for kernel in KERNELS for p in kernel.programs]
    assert len(listed) == len(set(listed))
    assert all(launched[p] == kernel.op for kernel in KERNELS for p in kernel.programs)


def test_each_row_has_its_files_and_probe_case():
    for kernel in KERNELS:
        assert hasattr(importlib.import_module(f"mexit.kernels.{kernel.reference}"), kernel.reference), kernel.op
        assert (ROOT / "kernels" / f"{kernel.op}.py").is_file() and (ROOT / kernel.test).is_file(), kernel.op
        assert kernel.probed in ("always", "chosen")
    assert set(probe.CASES) == {kernel.op for kernel in KERNELS}


@pytest.mark.parametrize("op", [kernel.op for kernel in KERNELS])
def test_the_probe_passes_each_kernel_and_names_a_wrong_one(op, monkeypatch):
    """Each row's probe case passes on the kernel and, when the kernel computes something else (its result off by
    one, or nothing written for a kernel that writes in place), its comparison fails naming the kernel."""
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert probe.probe(op, device) is None
    module = importlib.import_module(f"mexit.kernels.{op}")
    right = getattr(module, op)

    def wrong(*args, **kwargs):
        out = right(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out + 1
        if dataclasses.is_dataclass(out):  # the exit stage's output
            return dataclasses.replace(out, logits=out.logits + 1)
        if isinstance(out, tuple):  # acd_contrast: (token, log_q)
            return (out[0] + 1, *out[1:])
        return None

    in_place = ("exit_decide", "propagate_kv", "step_epilogue", "check_states")
    monkeypatch.setattr(module, op, (lambda *args, **kwargs: None) if op in in_place else wrong)
    problem = probe.probe(op, device)
    assert problem.startswith(op) and problem.endswith("disagrees with its reference"), problem


def test_probe_kernels_covers_the_rows_probed_always(monkeypatch):
    seen = []
    monkeypatch.setattr(probe, "probe", lambda op, device: seen.append(op))
    probe.probe_kernels.cache_clear()
    try:
        assert probe.probe_kernels(torch.device("cpu")) is None
    finally:
        probe.probe_kernels.cache_clear()
    assert seen == [kernel.op for kernel in KERNELS if kernel.probed == "always"]
    assert "control_repetition" in seen and "check_states" in seen
