"""GPU gate without a GPU: every Triton kernel specialization the runtime launches (a representative set: each
kernel and schedule, the batch buckets' tile regimes, fp16 and bf16) compiles for sm_90a and sm_80 with no
register spill and shared memory within the target's limit (bench/aot_compile.py; the full sweep runs there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_fused_linear", "_decode_attention", "_decode_attention_merge", "_exit_head_tiles", "_exit_head_merge",
           "_acd_tiles", "_acd_merge", "_exit_decide", "_propagate_kv"}


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "aot_compile.py"), "--ci", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == KERNELS
    for target in ("sm_90a", "sm_80"):
        compiled = [r for r in rows if r["target"] == target]
        assert {r["kernel"] for r in compiled} == KERNELS
        assert all(r["spill_bytes"] == 0 and r["registers"] and "error" not in r for r in compiled)
    assert {"*fp16", "*bf16"} <= {d for r in rows for d in r["dtypes"]}
