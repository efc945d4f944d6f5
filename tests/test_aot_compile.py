"""GPU gate without a GPU: every Triton kernel specialization the runtime launches (a representative set: each
kernel and schedule, the batch buckets' tile regimes, fp16 and bf16) compiles for sm_90a and sm_80 with no
register spill and shared memory within the target's limit; the programmatic-dependent-launch variants compile for
sm_90a with `griddepcontrol.wait` / `launch_dependents` in their PTX and the weight kernels' first loads issued
before the wait (bench/aot_compile.py; the full sweep runs there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mexit.ops.catalog import KERNELS as CATALOG
from mexit.ops.catalog import prefetching, programs

ROOT = Path(__file__).resolve().parents[1]
KERNELS = programs()  # every program of the kernel catalog
PREFETCHING = prefetching()
NO_PDL = {p for kernel in CATALOG if not kernel.pdl for p in kernel.programs}


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "mexit.bench.aot_compile", "--ci", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["compilations"]
    assert {r["kernel"] for r in rows} == KERNELS
    for target in ("sm_90a", "sm_80"):
        compiled = [r for r in rows if r["target"] == target]
        assert {r["kernel"] for r in compiled} == KERNELS
        assert all(r["spill_bytes"] == 0 and r["registers"] and "error" not in r for r in compiled)
        assert all(r["ptxas_log"] == "triton" for r in compiled)  # the cubin Triton builds, with its ptxas options
    assert {"*fp16", "*bf16"} <= {d for r in rows for d in r["dtypes"]}
    pdl = [r for r in rows if r["pdl"]]
    # no split cache in the PDL set; the repetition controls launch without PDL (their successor waits for them)
    assert {r["kernel"] for r in pdl} == KERNELS - {"_decode_attention_merge"} - NO_PDL
    assert all(r["target"] == "sm_90a" and r["griddepcontrol"] and r["launches_dependents"] for r in pdl)
    prefetch = [r for r in pdl if r["kernel"] in PREFETCHING and not r["constexprs"].get("HAS_SKIP")]
    assert {r["kernel"] for r in prefetch} == PREFETCHING and all(r["loads_before_wait"] > 0 for r in prefetch)
    assert not any(r["griddepcontrol"] for r in rows if not r["pdl"])  # off: no PDL instruction at all
    assert all(r["triggers_before_wait"] for r in pdl)  # dependents may launch (and prefetch) while it runs
    gemv = [r for r in rows if r["kernel"] == "_fused_gemv"]
    assert all(r["weight_loads"] and "error" not in r for r in gemv)
    assert all(r["weight_loads_after_wait"] == 0 for r in gemv if r["pdl"] and not r["constexprs"]["HAS_SKIP"])
    wide = [r for r in gemv if r["constexprs"]["BLOCK_K"] >= 1024]
    assert wide and all(r["weight_loads_16B"] == r["weight_loads"] for r in wide)  # 16-byte weight loads
    plan = [r for r in report["plan"] if r["kernel"] == "gemv"]
    assert len(plan) == 8 and not any("error" in r for r in plan)
    need = {"sm_90a": 4 << 20, "sm_80": 2 << 20}  # Little's law at each card's bandwidth
    assert all(r["programs"] >= 264 and r["in_flight"] >= min(need[r["target"]], r["weight"]) for r in plan)
    assert all(r["registers"] <= 96 and r["programs_per_sm"] >= 4 for r in plan)


def test_the_order_checks_catch_a_weight_load_sunk_past_the_wait():
    """The PTX checks on a made-up PDL GEMV: weight loads before the wait pass; one moved after it, a wait before
    the trigger, or a narrow weight load fail."""
    from mexit.bench.aot_compile import Launch, gemv_findings, pdl_findings

    launch = Launch("_fused_gemv", "kernels.fused_gemv", (("w_ptr", "*fp16"), ("K", "i32")),
                    (("HAS_SKIP", False), ("BLOCK_N", 4), ("BLOCK_K", 1024)), 4, 1, True, ("w_ptr", "K"))
    load = "ld.global.L1::evict_first.L2::cache_hint.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1 + 0], %rd9;"
    good = f"griddepcontrol.launch_dependents;\n{load}\n{load}\ngriddepcontrol.wait;\nld.global.v4.b32 {{%r5}}, [%rd2];"
    assert "error" not in gemv_findings(launch, good, "tt.func") and "error" not in pdl_findings(launch, good)
    sunk = good.replace(f"{load}\ngriddepcontrol.wait;", f"griddepcontrol.wait;\n{load}")
    assert "after griddepcontrol.wait" in gemv_findings(launch, sunk, "tt.func")["error"]
    late = good.replace("griddepcontrol.launch_dependents;\n", "").replace("ld.global.v4.b32", "griddepcontrol."
                                                                             "launch_dependents;\nld.global.v4.b32")
    assert "waits before" in pdl_findings(launch, late)["error"]
    assert "16-byte" in gemv_findings(launch, good.replace(".v4.b32 {%r1, %r2, %r3, %r4}", ".b16 {%rs1}"),
                                      "tt.func")["error"]
    assert "loop" in gemv_findings(launch, good, "scf.for %i")["error"]
