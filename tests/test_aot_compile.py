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

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_fused_linear", "_decode_attention", "_decode_attention_merge", "_exit_head_tiles", "_exit_head_merge",
           "_acd_tiles", "_acd_merge", "_exit_decide", "_propagate_kv", "_step_epilogue", "_control_repetition",
           "_check_states"}
PREFETCHING = {"_fused_linear", "_exit_head_tiles", "_propagate_kv"}


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "mexit.bench.aot_compile", "--ci", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == KERNELS
    for target in ("sm_90a", "sm_80"):
        compiled = [r for r in rows if r["target"] == target]
        assert {r["kernel"] for r in compiled} == KERNELS
        assert all(r["spill_bytes"] == 0 and r["registers"] and "error" not in r for r in compiled)
    assert {"*fp16", "*bf16"} <= {d for r in rows for d in r["dtypes"]}
    pdl = [r for r in rows if r["pdl"]]
    # no split cache in the PDL set; the repetition controls launch without PDL (their successor waits for them)
    assert {r["kernel"] for r in pdl} == KERNELS - {"_decode_attention_merge", "_control_repetition"}
    assert all(r["target"] == "sm_90a" and r["griddepcontrol"] and r["launches_dependents"] for r in pdl)
    prefetch = [r for r in pdl if r["kernel"] in PREFETCHING and not r["constexprs"].get("HAS_SKIP")]
    assert {r["kernel"] for r in prefetch} == PREFETCHING and all(r["loads_before_wait"] > 0 for r in prefetch)
    assert not any(r["griddepcontrol"] for r in rows if not r["pdl"])  # off: no PDL instruction at all
