"""Which kernel runs a block linear: the Backend's cut-offs, the defaults a CUDA card gets from its measurements
(`mexit/ops/routes.json`), the ranking that writes them (bench/rank_routes.py) and the step breakdown's
arithmetic (bench/graph_breakdown.py)."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from mexit.bench.graph_breakdown import analyze
from mexit.bench.rank_routes import rank
from mexit.ops import GEMV_MAX_ROWS, LINEAR_PATHS, Backend
from mexit.ops import backend as backend_module
from mexit.ops.routes import ROUTES_FILE, measured_route


def test_linear_kernel_by_rows_and_skip_flag():
    gemv = Backend("triton", gemv_max_rows=8, fused_max_rows=0)
    assert [gemv.linear_kernel(b) for b in (1, 8, 9, 64)] == ["gemv", "gemv", "cublas", "cublas"]
    assert gemv.linear_kernel(64, skip=True) == "fused"  # a skip flag needs a kernel: the tiled one above 8 rows
    tiled = Backend("triton")
    assert [tiled.linear_kernel(b) for b in (1, 64, 65)] == ["fused", "fused", "cublas"]
    assert tiled.linear_kernel(3, skip=True) == "fused"  # no GEMV asked for: the tiled kernel takes the flag
    assert Backend().linear_kernel(1) == "cublas"
    assert {name: Backend("triton", **kw).linear_kernel(1) for name, kw in LINEAR_PATHS.items()} == \
        {"cublas": "cublas", "tiled": "fused", "gemv": "gemv"}
    with pytest.raises(ValueError, match="gemv_max_rows must be in 0..8"):
        Backend("triton", gemv_max_rows=GEMV_MAX_ROWS + 1)
    with pytest.raises(ValueError, match="needs the triton backend"):
        Backend("torch", gemv_max_rows=8)


def test_routes_file_names_every_setting_and_a_default():
    table = json.loads(ROUTES_FILE.read_text())
    for entry in [table["default"], *table["cards"].values()]:
        assert {"fused_max_rows", "gemv_max_rows", "pdl", "measured"} <= set(entry)
        Backend("triton", fused_max_rows=entry["fused_max_rows"], gemv_max_rows=entry["gemv_max_rows"])
    assert measured_route("NVIDIA H200")["card"] == "NVIDIA H200"
    assert measured_route("a card nobody measured") == dict(table["default"], card="default")


def test_cuda_defaults_follow_the_cards_measurements(monkeypatch):
    """Settings left None come from the card's entry; what the user gives wins; CPU keeps the kernels."""
    monkeypatch.setattr(backend_module, "card_name", lambda device: "Test Card")
    monkeypatch.setattr(backend_module, "measured_route",
                        lambda card: dict(fused_max_rows=16, gemv_max_rows=8, pdl=True, card=card))
    monkeypatch.setattr(backend_module, "pdl_supported", lambda device: True)
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    monkeypatch.setattr(backend_module, "probe_gemv", lambda device: None)
    cuda = torch.device("cuda")
    assert backend_module.resolve_backend("triton", cuda) == Backend("triton", fused_max_rows=16, pdl=True,
                                                                     gemv_max_rows=8)
    monkeypatch.setattr(backend_module, "probe_gemv", lambda device: "fused_gemv: CompilationError")
    with pytest.warns(UserWarning, match="GEMV block linears cannot run"):  # the GEMV off, the kernels kept
        assert backend_module.resolve_backend("triton", cuda).gemv_max_rows == 0
    assert backend_module.resolve_backend("triton", cuda, pdl=False, gemv_max_rows=0) == \
        Backend("triton", fused_max_rows=16, gemv_max_rows=0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_module.resolve_backend("triton", torch.device("cpu")) == Backend("triton")  # tiled to 64 rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend_module.resolve_backend("torch", torch.device("cpu"), gemv_max_rows=8) == Backend("torch")
    assert any("triton backend" in str(w.message) for w in caught)


def rows(times: dict) -> list[dict]:
    return [dict(impl="mexit", mode=f"original [{path}]" + (" +pdl" if pdl else ""), batch=batch,
                 linear_path=path, pdl=pdl, ms_per_token=ms) for (batch, path, pdl), ms in times.items()]


def test_rank_routes_picks_the_fastest_measured_path():
    fast_gemv = rows({(1, "cublas", False): 1.0, (1, "tiled", False): 1.2, (1, "gemv", False): 0.6,
                      (1, "gemv", True): 0.5, (64, "cublas", False): 2.0, (64, "tiled", False): 2.6})
    assert {k: v for k, v in rank(fast_gemv, "X").items() if k != "measured"} == \
        dict(fused_max_rows=0, gemv_max_rows=8, pdl=True)
    slow = rows({(1, "cublas", False): 1.0, (1, "gemv", False): 1.1, (1, "cublas", True): 1.05,
                 (64, "cublas", False): 2.0, (64, "tiled", False): 1.9})
    entry = rank(slow, "X")  # the tiled kernel won at 64 but lost at 1: no cut-off above a loss
    assert (entry["gemv_max_rows"], entry["fused_max_rows"], entry["pdl"]) == (0, 0, False)
    assert "batch 1: cublas 1.000" in entry["measured"]
    gemv_then_tiled = rows({(1, "cublas", False): 1.0, (1, "tiled", False): 0.9, (1, "gemv", False): 0.6,
                            (64, "cublas", False): 2.0, (64, "tiled", False): 1.5})
    entry = rank(gemv_then_tiled, "X")  # batch 1 is the GEMV's: it does not cut the tiled kernel off at 64
    assert (entry["gemv_max_rows"], entry["fused_max_rows"]) == (8, 64)
    with pytest.raises(ValueError, match="--linear"):
        rank([dict(impl="transformers", mode="original", batch=1, ms_per_token=3.0)], "X")


def test_rank_routes_cli_writes_the_cards_entry(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text(json.dumps([dict(r, device="Test Card") for r in rows(
        {(1, "cublas", False): 1.0, (1, "gemv", False): 0.7})]))
    done = subprocess.run([sys.executable, "-m", "mexit.bench.rank_routes", str(path), "--out",
                           str(tmp_path / "routes.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "routes.json").read_text())["Test Card"]["gemv_max_rows"] == 8


def test_breakdown_adds_kernels_and_gaps_up_to_the_step():
    """Markers split the trace into steps; the prompt's region and the first steps are left out; kernels + gaps
    are the step's span, an overlap (PDL) a negative gap."""
    events = [("prefill", 0, 5), ("spin_kernel", 6, 7)]
    t = 10
    for _ in range(6):
        events += [("gemv", t, t + 3), ("attention", t + 2.5, t + 4), ("spin_kernel", t + 10, t + 11)]
        t += 20
    out = analyze(events, skip_steps=2)
    assert out["steps"] == 4 and out["launches_per_step"] == 2
    assert out["step_us"] == pytest.approx(out["kernels_us"] + out["gaps_us"]) == pytest.approx(4.0)
    assert out["gap_mean_us"] == pytest.approx(-0.5)
    assert [r["name"] for r in out["per_kernel"]] == ["gemv", "attention"]
    assert analyze([("spin_kernel", 0, 1)])["steps"] == 0
