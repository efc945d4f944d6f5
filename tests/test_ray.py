"""Sweeps and data sets on a Ray cluster (a local one with 2 CPU workers, started here): the same rows and files
as one process writes, a worker killed mid-sweep losing nothing, and resumption."""

import csv
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from mexit.bench import ablate
from mexit.frontends.cli import main


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"prompt number {i} about the cat and the sea" for i in range(24)) + "\n")
    return path


def sweep_args(folder, out, prompts, *extra):
    return ["--model", str(folder), "--prompts", str(prompts), "--max-new-tokens", "12", "--repeats", "2",
            "--thresholds", "0.0", "0.3", "0.6", "1.0", "--measures", "max-prob", "cosine", "--out", str(out),
            "--quiet", "--no-plot", *extra]


def read_rows(out):
    return {row["key"]: row for row in map(json.loads, (out / "ablation.jsonl").read_text().splitlines())}


def kill_a_busy_worker(log: Path, stop: threading.Event, killed: list) -> None:
    """Once the sweep has written a row, SIGKILL a worker busy with a task (Ray titles it ray::Guarded.call)."""
    while not stop.is_set() and not (log.exists() and log.read_text()):
        time.sleep(0.002)
    while not stop.is_set() and not killed:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if b"Guarded.call" in cmdline.read_bytes():
                    pid = int(cmdline.parent.name)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            except (OSError, ProcessLookupError):  # a process that ended meanwhile
                continue
        time.sleep(0.002)


def test_ablation_on_ray_equals_one_process_and_loses_nothing(cluster, tiny_checkpoint, tmp_path, prompts, capsys):
    folder = tiny_checkpoint[0]
    assert ablate.main(sweep_args(folder, tmp_path / "one", prompts)) == 0
    alone = read_rows(tmp_path / "one")

    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_a_busy_worker, args=(tmp_path / "ray" / "ablation.jsonl", stop, killed))
    killer.start()
    try:
        assert ablate.main(sweep_args(folder, tmp_path / "ray", prompts, "--ray")) == 0
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was seen evaluating: the kill was not exercised"
    spread = read_rows(tmp_path / "ray")
    assert spread.keys() == alone.keys() and len(spread) == 8  # the same settings, each once, none lost
    for key, row in spread.items():
        for column in ("agreement", "loglik", "repetition", "mean_exit_layer", "exit_histogram", "weight_bytes_ratio"):
            assert row[column] == alone[key][column], (key, column)
        assert row["speedup"] > 0 and row["seconds"] > 0 and row["full_depth_seconds"] > 0
    assert all("pid" in row["worker"] for row in spread.values())  # which process timed each row
    csv_rows = (tmp_path / "ray" / "ablation.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 1 + 8 and csv_rows[1].startswith("full depth")

    capsys.readouterr()
    assert ablate.main(sweep_args(folder, tmp_path / "ray", prompts, "--ray")) == 0  # a rerun: nothing to do
    assert "8 settings, 8 already in" in capsys.readouterr().err
    assert len((tmp_path / "ray" / "ablation.jsonl").read_text().splitlines()) == 8
    points = [[row["point"] for row in csv.DictReader((tmp_path / name / "ablation.csv").open())]
              for name in ("one", "ray")]
    assert points[0] == points[1]  # identical work grouped alike: the findings read the same kind of data

    # a run resumes whatever the executor: one machine's file cut to 3 rows resumed on Ray, and the reverse
    for first, then in (("one", ["--ray"]), ("ray", [])):
        mixed = tmp_path / f"from-{first}"
        mixed.mkdir()
        lines = (tmp_path / first / "ablation.jsonl").read_text().splitlines(keepends=True)
        (mixed / "ablation.jsonl").write_text("".join(lines[:3]))
        shutil.copy(tmp_path / first / "ablation.jsonl.settings.json", mixed)
        capsys.readouterr()
        assert ablate.main(sweep_args(folder, mixed, prompts, *then)) == 0
        assert "8 settings, 3 already in" in capsys.readouterr().err
        assert read_rows(mixed).keys() == alone.keys()

    # and is refused under other run settings, on Ray as on one machine (before the workers' reference runs)
    before = (tmp_path / "ray" / "ablation.jsonl").read_text()
    with pytest.raises(ValueError, match="propagation='eager', this run asks propagation='deferred'"):
        ablate.main(sweep_args(folder, tmp_path / "ray", prompts, "--ray", "--propagation", "deferred"))
    assert (tmp_path / "ray" / "ablation.jsonl").read_text() == before


def test_bad_settings_on_ray_are_one_error(cluster, tiny_checkpoint, tmp_path, prompts):
    with pytest.raises(ValueError, match=r"exit layers \[9\] are not in this checkpoint"):
        ablate.main(sweep_args(tiny_checkpoint[0], tmp_path / "bad", prompts, "--exit-sets", "2,9", "--ray"))


@pytest.mark.parametrize("sampling", [[], ["--do-sample", "--seed", "11", "--top-k", "20"]], ids=["greedy", "sampled"])
def test_prompts_file_on_ray_equals_one_machine(cluster, tiny_checkpoint, tmp_path, sampling, capsys):
    data = tmp_path / "data.jsonl"
    lines = [{"prompt": f"line {i} of the data"} if i % 3 else {"input_ids": [i + 1, 7, 9], "id": f"r{i}"}
             for i in range(11)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["generate", "--model", str(tiny_checkpoint[0]), "--prompts-file", str(data), "--max-new-tokens", "7",
              "--batch", "3", *sampling]
    assert main([*common, "--out", str(tmp_path / "one.jsonl")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray.jsonl"), "--ray"]) == 0
    one, spread = (tmp_path / "one.jsonl").read_text(), (tmp_path / "ray.jsonl").read_text()
    assert spread == one and len(one.splitlines()) == 11
    assert [json.loads(line)["index"] for line in spread.splitlines()] == list(range(11))  # input order
    (tmp_path / "ray.jsonl").write_text("".join(one.splitlines(keepends=True)[:4]))  # an interrupted run
    capsys.readouterr()
    resume = [arg for arg in common if arg not in ("--seed", "11")]  # a sampled run resumes with its own seed
    assert main([*resume, "--out", str(tmp_path / "ray.jsonl"), "--ray"]) == 0
    assert "7 prompts (4 already there" in capsys.readouterr().out
    assert (tmp_path / "ray.jsonl").read_text() == one
    if sampling:
        (tmp_path / "ray.jsonl").write_text("".join(one.splitlines(keepends=True)[:4]))
        assert main([*resume, "--seed", "12", "--out", str(tmp_path / "ray.jsonl"), "--ray"]) == 2
        assert "was sampled with seed 11 + row index" in capsys.readouterr().err


def test_worker_errors_are_one_line(cluster, tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("hello\nworld\n")
    base = ["generate", "--prompts-file", str(data), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2",
            "--ray"]
    assert main([*base, "--model", str(tmp_path / "no_such_model")]) == 2
    err = capsys.readouterr().err  # Ray's own log lines come first
    assert err.strip().splitlines()[-1].startswith("error: ") and "does not exist" in err and "Traceback" not in err
    assert main([*base, "--model", str(tiny_checkpoint[0]), "--device", "cuda"]) == 2
    assert "the Ray cluster has no GPU" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_ray_flags_without_ray_or_prompts_file(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    data = tmp_path / "data.txt"
    data.write_text("hello\n")
    base = ["generate", "--model", str(tiny_checkpoint[0]), "--max-new-tokens", "2"]
    assert main([*base, "--prompts-file", str(data), "--out", str(tmp_path / "o.jsonl"), "--ray"]) == 2
    assert 'pip install "mexit[ray]"' in capsys.readouterr().err
    assert main([*base, "--prompt", "hi", "--ray"]) == 2
    assert "--ray goes with --prompts-file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ray needs Ray"):
        ablate.main(sweep_args(tiny_checkpoint[0], tmp_path / "x", data, "--ray"))


def test_latency_cases_on_ray(cluster, tiny_checkpoint, tmp_path):
    from mexit.bench import latency

    argv = ["--model", str(tiny_checkpoint[0]), "--batch", "1", "2", "--prompt-len", "5", "--new-tokens", "4",
            "--warmup", "0", "--repeats", "1", "--modes", "original", "acd:4,2", "ee:max-prob:0:2", "--baselines",
            "--no-compile", "--no-plot"]
    assert latency.main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert latency.main([*argv, "--out", str(tmp_path / "ray"), "--ray"]) == 0
    one, spread = (json.loads((tmp_path / name / "latency.json").read_text()) for name in ("one", "ray"))
    assert [(r["mode"], r["batch"]) for r in spread] == [(r["mode"], r["batch"]) for r in one]  # case order
    for a, b in zip(one, spread):  # what does not depend on the clock is equal; each row says who timed it
        for column in ("launches_per_step", "weight_bytes_per_step", "step_mb"):
            assert a[column] == b[column], column
        assert b["ms_per_token"] > 0 and "pid" in b["worker"] and b["command"] == a["command"]  # the driver's
