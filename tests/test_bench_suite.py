"""The pytest-benchmark suite in bench/: it runs on CPU and writes its JSON with the decode calls' extra_info and
the machine's info, a second run prints the comparison with the stored one, and --benchmark-compare-fail fails a
run made slower on purpose."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELECT = [str(ROOT / "bench" / "bench_decode.py"), "-k", "original and 1", "--benchmark-only", "-p", "no:xdist",
          "-p", "no:cacheprovider"]


def suite(tmp_path, *extra):
    # run from tmp_path: pytest-benchmark names its storage relative to the working folder
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not this run's xdist worker
    done = subprocess.run([sys.executable, "-m", "pytest", *SELECT, "--benchmark-storage=file://runs", *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    return done.returncode, done.stdout + done.stderr


def test_runs_save_compare_and_fail_on_a_regression(tmp_path):
    out = tmp_path / "out.json"
    rc, log = suite(tmp_path, f"--benchmark-json={out}", "--benchmark-save=baseline")
    assert rc == 0, log[-3000:]
    run = json.loads(out.read_text())
    (row,) = run["benchmarks"]
    assert row["group"] == "decode call, small model, batch 1" and row["stats"]["rounds"] >= 5
    info = row["extra_info"]
    assert info["clock"] == "perf_counter" and info["threads"] >= 1 and info["launches"] > 0
    assert 0 < info["ms_per_token_min"] <= info["ms_per_token"] <= info["ms_per_token_max"]
    assert info["gb_s"] > 0 and 0 < info["pct_copy"] and info["bytes"] == info["weight_bytes_per_token"] * 32
    machine = run["machine_info"]["mexit"]
    assert machine["device"].startswith("cpu") and machine["copy_gbs"] > 0 and machine["torch"]
    assert list((tmp_path / "runs").rglob("*_baseline.json"))

    rc, log = suite(tmp_path, "--benchmark-compare")
    assert rc == 0 and "0001_baseline" in log and "(NOW)" in log, log[-3000:]

    rc, log = suite(tmp_path, "--benchmark-compare", "--benchmark-compare-fail=median:5%", "--bench-slowdown-ms=400")
    assert rc != 0 and "Performance has regressed" in log, log[-3000:]


def test_the_gpu_script_perf_stage_dry_runs_on_cpu(tmp_path):
    """`DRY=1 bash bench/gpu_check.sh perf` (CI's dry run of the GPU stage): every step runs on the CPU (GEMV
    tests, sweep, breakdown, end to end with the routes ranked, the suite once under --benchmark-disable,
    baselines), each appends its section to the summary, nothing is stored in the tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(DRY="1", OUT=str(tmp_path), SELECT="decode_attention and 128")
    done = subprocess.run(["bash", "bench/gpu_check.sh", "perf"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for section in ("### GEMV tests", "### Cold-weight sweep", "### Where the step's time goes", "### End to end",
                    "### Default routes", "### pytest-benchmark suite", "### Baselines"):
        assert section in summary, section
    gemv_line = summary.split("### GEMV tests\n")[1].splitlines()[0]
    assert " passed" in gemv_line and "failed" not in gemv_line and "perf stage: 0 step(s) failed" in summary
    assert "candidates agree with float64" in summary and "| `" in summary  # the sweep checked, a breakdown row
    assert "original [gemv]" in summary and "Traceback" not in summary
    assert "pytest-benchmark suite (-k decode_attention and 128), exit 0" in summary and " passed" in summary
    assert {"fused_max_rows", "gemv_max_rows", "pdl"} <= set(*json.loads((tmp_path / "routes.json").read_text())
                                                            .values())
    assert not (ROOT / "bench" / "benchmarks" / "cpu-dry-run").exists()


def test_every_mode_the_gpu_script_names_parses_for_gpt2_medium():
    """A mode string the GPU stages run but cannot parse would cost a GPU call: each one after `--modes` in
    bench/gpu_check.sh parses against gpt2-medium-multiexit's shape (the CPU dry run runs other modes)."""
    import re

    from mexit.decoding import modes
    from mexit.model.config import GPT2_MEDIUM_MULTIEXIT

    script = (ROOT / "bench" / "gpu_check.sh").read_text().replace("\\\n", " ")
    named = [text for group in re.findall(r"--modes((?:[ \t]+[a-z][\w:.,-]*)+)", script) for text in group.split()]
    assert len(named) >= 20 and "ee:max-prob:0:12:deferred" in named and "dola:high" in named
    for text in named:
        modes.parse(text, GPT2_MEDIUM_MULTIEXIT)
