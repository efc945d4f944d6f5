"""The latency benchmark and the threshold ablation run on CPU on a tiny checkpoint: fields and invariants."""

import csv
import json
import warnings

import pytest
import torch

from mexit.bench import ablate, bench_exit_head, bench_fused_linear, latency


def latency_args(folder, out, **kw):
    argv = ["--model", str(folder), "--batch", "1", "2", "--prompt-len", "5", "9", "--new-tokens", "8", "--warmup", "1",
            "--repeats", "3", "--modes", "original", "exit:2", "acd:4,2", "ee:max-prob:0:2", "ee:margin:0:all:deferred",
            "--no-compile", "--out", str(out)]
    for k, v in kw.items():
        argv += [f"--{k}", *v] if isinstance(v, list) else [f"--{k}", v]
    return argv


def test_latency_rows_and_files(tiny_checkpoint, tmp_path):
    assert latency.main(latency_args(tiny_checkpoint[0], tmp_path)) == 0
    rows = json.loads((tmp_path / "latency.json").read_text())
    timed = [r for r in rows if "skipped" not in r]
    assert {(r["impl"], r["mode"], r["batch"], r["prompt_len"]) for r in timed} >= {
        ("mexit", "original", 1, 5), ("mexit", "acd:4,2", 2, 9), ("transformers eager", "original", 2, 5)}
    assert all(r["new_tokens"] == 8 for r in timed)
    for r in timed:
        assert r["ms_per_token"] > 0 and r["prefill_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["ms_per_token_min"] <= r["ms_per_token"] <= r["ms_per_token_max"]
        assert 0 < r["pct_roofline"] and r["floor_ms"] > 0 and r["copy_gb_s"] > 0
        assert r["device"] and r["dtype"] == "float32" and r["torch"] and "random_weights" in r
    ee = [r for r in timed if r["mode"] == "ee:max-prob:0:2"]
    assert all(r["mean_exit_layer"] == 2 for r in ee)
    assert all(r["mean_exit_layer"] == 1 for r in timed if r["mode"] == "ee:margin:0:all:deferred")
    by_mode = {r["mode"]: r for r in timed if r["batch"] == 1 and r["prompt_len"] == 5 and r["impl"] == "mexit"}
    assert by_mode["exit:2"]["step_mb"] < by_mode["original"]["step_mb"] < by_mode["acd:4,2"]["step_mb"]
    skipped = [r for r in rows if "skipped" in r]
    assert any(r["impl"] == "autocontrastive-gen" and "not installed" in r["skipped"] for r in skipped)
    for name in ("latency.csv", "latency.md", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| mexit | acd:4,2 |" in (tmp_path / "latency.md").read_text()


@pytest.mark.parametrize("modes,message", [
    (["beam:4"], "unknown mode 'beam:4'"),
    (["exit:7"], "exit layer 7 is not in this checkpoint"),
    (["acd:9,2"], "exit layer 9 is not in this checkpoint"),
    (["ee:max-prob:1.5"], r"threshold for max-prob must be in \[0, 1\]"),
    (["ee:max-prob:0:2:predicated"], "predicated early-exit schedule needs backend='triton'"),
    (["original", "exit:2", "original"], r"--modes lists \['original'\] twice"),
])
def test_latency_bad_settings_fail_before_work(tiny_checkpoint, tmp_path, modes, message):
    with pytest.raises(ValueError, match=message):  # the static engine: predicated would need triton
        latency.main(latency_args(tiny_checkpoint[0], tmp_path / "out", modes=modes, engine="static",
                                  backend="torch"))
    assert not (tmp_path / "out").exists()


def test_pdl_is_refused_where_it_cannot_run(tiny_checkpoint, tmp_path):
    """--pdl on / both needs the triton backend on a Hopper-or-newer GPU: refused before any work (here: CPU)."""
    argv = latency_args(tiny_checkpoint[0], tmp_path / "out", modes=["original"], engine="static", backend="triton")
    with pytest.raises(ValueError, match="--pdl both needs the triton backend"):
        latency.main(argv + ["--pdl", "both"])
    assert not (tmp_path / "out").exists()


def test_bench_refuses_what_generate_refuses_and_labels_what_ran(tiny_checkpoint, tmp_path, capsys):
    """A predicated early-exit mode on the eager engine is refused by name, as `mexit generate` refuses it (the eager
    engine would run the reference scheduler under that label); --compile where nothing compiles warns and the rows
    say compiled false."""
    argv = latency_args(tiny_checkpoint[0], tmp_path / "p", modes=["ee:max-prob:0.9:2:predicated"], engine="eager")
    with pytest.raises(ValueError, match="the predicated schedule is a static-engine schedule"):
        latency.main(argv)
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="--fused-max-rows needs the triton backend"):
        latency.main(latency_args(tiny_checkpoint[0], tmp_path / "f", backend="torch", **{"fused-max-rows": "8"}))
    argv = ["--model", str(tiny_checkpoint[0]), "--modes", "original", "--new-tokens", "2", "--prompt-len", "4",
            "--warmup", "0", "--repeats", "1", "--no-plot", "--baselines", "--compile", "--out", str(tmp_path / "c")]
    with pytest.warns(UserWarning, match="compile ignored: nothing is compiled"):
        assert latency.main(argv) == 0
    assert not json.loads((tmp_path / "c" / "latency.json").read_text())[0]["compiled"]


def test_bench_checks_its_output_folder_before_the_run(tiny_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(latency, "LatencyBench", lambda *a: pytest.fail("measured before --out was checked"))
    with pytest.raises(ValueError, match="--out .*file exists and is not a folder"):
        latency.main(latency_args(tiny_checkpoint[0], tmp_path / "file"))


def ablate_args(folder, out, prompts, **kw):
    argv = ["--model", str(folder), "--prompts", str(prompts), "--max-new-tokens", "6", "--out", str(out),
            "--quiet", "--no-plot", "--repeats", "2"]
    for k, v in kw.items():
        argv += [f"--{k}", *map(str, v)]
    return argv


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello world\n\nThe cat sat on\nA B C\n")
    return path


def test_ablation_invariants_and_resume(tiny_checkpoint, tmp_path, prompt_file, monkeypatch):
    out = tmp_path / "abl"
    argv = ablate_args(tiny_checkpoint[0], out, prompt_file, thresholds=[0.0, 0.4, 1.0],
                       measures=["max-prob", "cosine"], **{"exit-sets": ["all", "2"], "decay-tau": ["none", "4"]})
    assert ablate.main(argv) == 0
    rows = [json.loads(line) for line in (out / "ablation.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2 * 2
    for r in rows:
        assert sum(r["exit_histogram"].values()) == 3 * 6  # 3 prompts x 6 tokens
        assert 0 <= r["agreement"] <= 1 and r["loglik"] < 0 and 0 <= r["repetition"] <= 1 and r["speedup"] > 0
        if r["threshold"] == 1.0:  # unreachable: full depth, identical output
            assert r["mean_exit_layer"] == 4 and r["agreement"] == 1.0
        if r["threshold"] == 0.0 and r["exits"] == "2" and r["measure"] == "max-prob":
            assert r["mean_exit_layer"] == 2
    full = [r for r in rows if r["threshold"] == 1.0]
    assert len({round(r["loglik"], 6) for r in full}) == 1  # the same full-depth output, scored the same way
    with monkeypatch.context() as m:
        m.setattr(ablate, "evaluate", lambda *a, **k: pytest.fail("a finished setting ran again"))
        assert ablate.main(argv) == 0
    assert len((out / "ablation.jsonl").read_text().splitlines()) == len(rows)
    table = list(csv.DictReader((out / "ablation.csv").open()))
    assert len(table) == len(rows) + 1 and table[0]["measure"] == "full depth"  # the reference is a row too
    reference = table[0]
    assert float(reference["speedup"]) == 1.0 and float(reference["agreement"]) == 1.0
    assert float(reference["loglik"]) == pytest.approx(full[0]["loglik"], abs=1e-6)
    for r in rows:
        assert r["speedup_lo"] <= r["speedup"] <= r["speedup_hi"] and len(r["pairs"]) == r["timed_pairs"] == 2
        assert r["model"] == str(tiny_checkpoint[0].resolve()) and r["torch"] and r["repeats"] == 2
    for r in table[1:]:  # the findings (they need every row: in the csv): only settings faster beyond the noise
        assert r["worth_using"] == "False" or r["faster_than_full_depth"] == "True"
        assert r["faster_than_full_depth"] == str(float(r["speedup_lo"]) > 1) or " = " in r["point"]  # pooled
        assert float(r["loglik_delta_lo"]) <= float(r["loglik_delta"]) <= float(r["loglik_delta_hi"])
    # settings that never exit read the same weights and give the same tokens: one point, whatever their labels
    never = [r for r in table if r["threshold"] == "1.0" and r["measure"] == "max-prob" and r["exits"] == "all"]
    assert len(never) == 2 and never[0]["point"] == never[1]["point"] and " = " in never[0]["point"]
    # other run settings (here deferred propagation) would measure other speed-ups: refused by name, nothing written
    before = (out / "ablation.jsonl").read_text()
    again = ablate_args(tiny_checkpoint[0], out, prompt_file, thresholds=[0.4], propagation=["deferred"])
    with monkeypatch.context() as m, \
            pytest.raises(ValueError, match="propagation='eager', this run asks propagation='deferred'"):
        m.setattr(ablate, "timed_generate", lambda *a, **k: pytest.fail("generated before the refusal"))
        ablate.main(again)
    assert (out / "ablation.jsonl").read_text() == before
    assert ablate.main(ablate_args(tiny_checkpoint[0], tmp_path / "deferred", prompt_file, thresholds=[0.4],
                                   propagation=["deferred"])) == 0


def test_a_resume_on_ray_is_refused_before_any_worker_generates(tiny_checkpoint, tmp_path, prompt_file, monkeypatch):
    """The driver's order on Ray, without a cluster: workers built (no generation), described, the settings record
    checked, and only then the references measured; a resume under other settings stops before that."""
    from mexit.frontends import cluster

    calls = []

    class Workers:  # the cluster's Workers, in this process
        def __init__(self, build, args, count, options):
            self.sweep = build(*args)
            calls.append("built")

        def call_all(self, method, *a):
            calls.append(method)
            return [getattr(self.sweep, method)(*a)]

        def call_one(self, method, *a):
            calls.append(method)
            return getattr(self.sweep, method)(*a)

        def map(self, method, items):
            calls.append(method)
            return (getattr(self.sweep, method)(i) for i in items)

        def close(self):
            pass

    monkeypatch.setattr(cluster, "Workers", Workers)
    monkeypatch.setattr(cluster, "connect", lambda address: None)
    monkeypatch.setattr(cluster, "worker_resources", lambda device, threads, tasks=None: (1, {}))
    monkeypatch.setattr(ablate, "timed_generate", lambda *a, **k: calls.append("generate") or ablate_generate(*a, **k))
    out = tmp_path / "abl"
    assert ablate.main(ablate_args(tiny_checkpoint[0], out, prompt_file, thresholds=[0.4], ray=[])) == 0
    assert calls.index("describe") < calls.index("measure_reference") < calls.index("generate")
    calls.clear()
    with pytest.raises(ValueError, match="propagation='eager', this run asks propagation='deferred'"):
        ablate.main(ablate_args(tiny_checkpoint[0], out, prompt_file, thresholds=[0.4], propagation=["deferred"],
                                ray=[]))
    assert calls == ["built", "describe"]


ablate_generate = ablate.timed_generate


def test_a_truncated_ablation_file_resumes_to_the_same_rows(tiny_checkpoint, tmp_path, prompt_file):
    """A kill can cut ablation.jsonl at any byte: a partial last line is dropped (with a warning) and its setting
    measured again; the resumed file holds the same settings with the same deterministic columns."""
    out = tmp_path / "abl"
    argv = ablate_args(tiny_checkpoint[0], out, prompt_file, thresholds=[0.0, 1.0], measures=["max-prob"])
    assert ablate.main(argv) == 0
    whole = (out / "ablation.jsonl").read_text()
    first = whole.index("\n") + 1
    same = ("key", "tokens_digest", "loglik_per_prompt", "agreement", "exit_histogram", "weight_bytes_ratio")
    for cut in (1, first - 1, first, first + 7, len(whole) - 1):
        (out / "ablation.jsonl").write_text(whole[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ablate.main(argv) == 0
        assert any("dropped a partial last line" in str(w.message) for w in caught) == (cut != first)
        resumed = [json.loads(line) for line in (out / "ablation.jsonl").read_text().splitlines()]
        original = [json.loads(line) for line in whole.splitlines()]
        assert [[r[k] for k in same] for r in resumed] == [[r[k] for k in same] for r in original], cut


def test_an_ablation_file_of_an_older_mexit_is_refused(tiny_checkpoint, tmp_path, prompt_file):
    """Rows without timing passes or per-prompt quality cannot give findings: refused by name before any work."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "ablation.jsonl").write_text(json.dumps({"key": "x|max-prob|0.5|all|None", "measure": "max-prob",
                                                    "speedup": 1.0, "speedup_min": 0.9}) + "\n")
    with pytest.raises(ValueError, match="written by an older mexit"):
        ablate.main(ablate_args(tiny_checkpoint[0], out, prompt_file, thresholds=[0.5]))


def test_ablation_findings_beyond_the_noise():
    """The front from synthetic rows: a setting whose interval reaches 1.0 is not worth using; a faster one with
    the same quality beats a slower one only beyond the speed margin; identical work is one point."""
    from mexit.bench.findings import mark_front
    from mexit.timing import t975

    assert t975(1) == 12.706 and t975(30) == 2.042 and 1.96 < t975(200) < 1.975
    with pytest.raises(ValueError, match="at least 2 samples"):
        t975(0)

    def row(label, ratios, quality, digest, blocks=4.0):
        pairs = [[1.0, 1.0 / r] for r in ratios]
        return dict(label=label, pairs=pairs, loglik_per_prompt=quality, tokens_digest=digest, weight_bytes_ratio=1,
                    blocks_per_step=blocks, heads_per_step=1, fill_blocks_per_step=0, predictors_per_step=0)

    q = [-2.0, -2.1, -1.9, -2.2]
    rows = [row("full depth", [1, 1], q, "ref"),
            row("noise", [0.97, 1.05, 1.02, 0.99], q, "a", 3),  # interval covers 1.0
            row("fast", [1.30, 1.31, 1.29, 1.30], [x - 0.5 for x in q], "b", 2),
            row("fast twin", [1.31, 1.30, 1.30, 1.29], [x - 0.5 for x in q], "b", 2),  # identical work
            row("a hair faster", [1.32, 1.31, 1.33, 1.32], [x - 0.5 for x in q], "c", 1.9),  # within the margin
            row("much faster, worse", [2.0, 2.02, 1.98, 2.0], [x - 1.0 for x in q], "d", 1),
            row("slower, same quality", [1.1, 1.11, 1.09, 1.1], [x - 0.5 for x in q], "e", 3.5)]  # beaten
    front = mark_front(rows)
    worth = {r["label"] for r in rows if r["worth_using"]}
    assert worth == {"fast", "fast twin", "a hair faster", "much faster, worse"}
    assert rows[2]["point"] == rows[3]["point"] == "fast = fast twin" and len(front) == 3
    assert not rows[1]["faster_than_full_depth"] and rows[6]["faster_than_full_depth"]


def test_interleaved_pairs_alternate_the_order_and_sum_each_pass():
    """The one pairing the ablation and --time-full-depth share: per pass the reference runs first where pass + unit
    is even, units sum per side, and the collector is on again after a pass that raised."""
    import gc

    from mexit.timing import interleaved_pairs

    calls = []

    def run(side):
        def time_unit(p, u):
            calls.append((p, u, side))
            assert not gc.isenabled()
            return 10.0 ** u + (side == "setting")
        return time_unit

    pairs = interleaved_pairs(run("reference"), run("setting"), passes=3, units=2)
    assert pairs == [[11.0, 13.0]] * 3
    firsts = [calls[i][2] for i in range(0, len(calls), 2)]
    assert firsts == ["reference", "setting", "setting", "reference", "reference", "setting"]
    assert gc.isenabled()

    def fails(p, u):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interleaved_pairs(fails, fails, passes=1)
    assert gc.isenabled()


@pytest.mark.parametrize("kw,message", [
    (dict(measures=["entropy"]), "unknown confidence measure 'entropy'"),
    (dict(measures=["learned"], **{"exit-sets": ["4"]}), "no exit to check"),
    (dict(**{"exit-sets": ["2,9"]}), r"exit layers \[9\] are not in this checkpoint"),
    (dict(thresholds=[1.5]), r"threshold for max-prob must be in \[0, 1\]"),
    (dict(**{"exit-sets": ["a,b"]}), "exit set 'a,b'"),
    (dict(schedule=["predicated"], engine=["static"], backend=["torch"]), "predicated early-exit schedule needs"),
    (dict(thresholds=[0.5, 0.5], measures=["max-prob"]), "'max-prob >= 0.5, exits all' is listed twice"),
    (dict(schedule=["predicated"], engine=["eager"]), "--schedule predicated is a static-engine schedule"),
    (dict(**{"speed-margin": ["nan"]}), "--speed-margin must be a finite number >= 0"),
    (dict(**{"exit-sets": ["2,2"]}), r"^setting --measures max-prob --thresholds 0.5 --exit-sets 2,2 --decay-tau none "
                                     r"--min-layer 1: exits lists a layer twice: \[2, 2\]"),
    (dict(**{"decay-tau": ["foo"]}), "--decay-tau: expected a number, got 'foo'"),
    (dict(**{"loglik-margin": ["-1"]}), "--loglik-margin must be a finite number >= 0"),
    (dict(spec=["1:2@acd:4,2"]), "--spec 1:2@acd:4,2: the ablation measures against the original head"),
])
def test_ablation_bad_settings_fail_before_work(tiny_checkpoint, tmp_path, prompt_file, kw, message, capsys):
    with pytest.raises(ValueError, match=message):
        ablate.main(ablate_args(tiny_checkpoint[0], tmp_path / "abl", prompt_file, **kw))
    assert not (tmp_path / "abl").exists()
    assert "stage 1/2" not in capsys.readouterr().err  # no stage begins before its settings are refused


def test_ablation_empty_prompt_file(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")  # (a line of spaces is a prompt, kept as written, as --prompts-file keeps it)
    with pytest.raises(ValueError, match="holds no prompt"):
        ablate.main(ablate_args(tiny_checkpoint[0], tmp_path / "abl", empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ablate.main(ablate_args(tiny_checkpoint[0], tmp_path / "abl", tmp_path / "missing.txt"))


def test_default_prompts_ship_with_the_package():
    assert len(ablate.read_prompts(ablate.DEFAULT_PROMPTS)) >= 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the scripts measure")
def test_kernel_scripts_send_a_cpu_to_the_suite(tmp_path, capsys):
    """The do_bench scripts (`gpu_check.sh kernels`) time a GPU only; their CPU smoke run is the pytest-benchmark
    suite under --benchmark-disable (bench/bench_*.py: the same calls, checked against float64)."""
    assert bench_exit_head.main(["--batch", "1", "--out", str(tmp_path)]) == 2
    assert bench_fused_linear.main(["--batch", "1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("--benchmark-disable") == 2


def test_cold_first_mode_cannot_give_a_negative_latency():
    """The report: per-token time was (T(n) - median T(1)) / (n - 1) over separate calls, so a mode whose T(1)
    calls ran cold printed a negative latency. Now prefill and decode are split inside each generation: a cold
    start inflates only that generation's prefill."""
    import time

    import torch

    calls = {"n": 0}

    def generate(n, clock):
        calls["n"] += 1
        time.sleep(0.05 if calls["n"] <= 2 else 0.002)  # cold: compilation, first-use allocation
        for _ in range(n):
            time.sleep(0.001)
            if clock is not None:
                clock.on_token()

    timing = latency.measure(generate, torch.device("cpu"), new_tokens=6, warmup=0, repeats=3)
    assert timing["ms_per_token_min"] > 0.5 and timing["prefill_ms"] > 0
    assert timing["prefill_max"] > 40  # the cold call's time stayed in its prefill


def test_every_row_has_cost_columns_and_no_impossible_number(tiny_checkpoint, tmp_path):
    modes = ["ee:max-prob:0:2", "acd:4,2", "original", "exit:2", "spec:2:2"]  # the reported order: ee first
    assert latency.main(latency_args(tiny_checkpoint[0], tmp_path, modes=modes, batch=["1", "2"],
                                     repeats="1", warmup="0")) == 0
    rows = [r for r in json.loads((tmp_path / "latency.json").read_text()) if "skipped" not in r]
    for r in rows:
        assert "invalid" in r or (r["ms_per_token"] > 0 and r["prefill_ms"] > 0 and r["tokens_per_s"] > 0)
        assert r["launches_per_step"] > 0 and r["weight_bytes_per_step"] > 0
        # the torch backend on CPU: torch's matmul (not cuBLAS); the triton kernels' row cut-offs do not apply
        assert r["impl"] != "mexit" or (r["linear"] == "torch" and r["fused_max_rows"] is r["gemv_max_rows"] is None)
    by_mode = {r["mode"]: r for r in rows if r["impl"] == "mexit" and r["batch"] == 1 and r["prompt_len"] == 5}
    assert by_mode["exit:2"]["launches_per_step"] < by_mode["original"]["launches_per_step"]
    assert 0 <= by_mode["spec:2:2"]["acceptance_rate"] <= 1
    for mode in ("original", "exit:2"):  # the weights a step reads do not depend on the batch or the prompt; its KV
        same = [r for r in rows if r["impl"] == "mexit" and r["mode"] == mode]  # cache read does
        assert len(same) == 4 and len({r["weight_bytes_per_step"] for r in same}) == 1
        assert len({r["kv_bytes_per_step"] for r in same}) == 4
        assert all(r["step_mb"] * 1e6 == pytest.approx(r["weight_bytes_per_step"] + r["kv_bytes_per_step"])
                   for r in same)
    for r in rows:
        for key in ("ms_per_token", "prefill_ms", "tokens_per_s", "pct_roofline"):
            assert key not in r or r[key] > 0


@pytest.mark.parametrize("flag,value", [("repeats", "0"), ("warmup", "-1")])
def test_bad_repeat_counts_are_refused(tiny_checkpoint, tmp_path, flag, value):
    with pytest.raises(ValueError, match="--repeats must be >= 1 and --warmup >= 0"):
        latency.main(latency_args(tiny_checkpoint[0], tmp_path / "out", **{flag: value}))


def test_identical_work_gives_speedups_within_their_spread(tiny_checkpoint, tmp_path, prompt_file):
    """max-prob and margin at threshold 0 with one checked exit both exit every token at layer 2: the same work,
    one point. Their interleaved speed-ups must agree within the intervals each reports."""
    out = tmp_path / "same"
    assert ablate.main(ablate_args(tiny_checkpoint[0], out, prompt_file, thresholds=[0.0],
                                   measures=["max-prob", "margin"], repeats=[5], **{"exit-sets": ["2"]})) == 0
    a, b = [json.loads(line) for line in (out / "ablation.jsonl").read_text().splitlines()]
    assert a["mean_exit_layer"] == b["mean_exit_layer"] == 2 and a["weight_bytes_ratio"] == b["weight_bytes_ratio"]
    assert a["speedup_lo"] <= a["speedup"] <= a["speedup_hi"] and a["repeats"] == 5
    points = {r["point"] for r in csv.DictReader((out / "ablation.csv").open())} - {"full depth"}
    assert points == {f"{a['label']} = {b['label']}"}  # one point
    assert max(a["speedup_lo"], b["speedup_lo"]) <= min(a["speedup_hi"], b["speedup_hi"])  # intervals overlap


def test_ablation_validation_failure_leaves_no_folder(tiny_checkpoint, tmp_path):
    long_prompts = tmp_path / "long.txt"
    long_prompts.write_text("x" * 70 + "\n")  # 70 byte-tokens + 6 new exceed the 64-position context
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ablate.main(ablate_args(tiny_checkpoint[0], tmp_path / "out", long_prompts, thresholds=[0.5]))
    assert not (tmp_path / "out").exists()


def test_ablation_ctrl_c_says_what_was_saved(tiny_checkpoint, tmp_path, prompt_file, monkeypatch, capsys):
    calls = {"n": 0}
    real = ablate.evaluate

    def interrupt_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ablate, "evaluate", interrupt_second)
    argv = ablate_args(tiny_checkpoint[0], tmp_path / "abl", prompt_file, thresholds=[0.0, 0.5, 1.0],
                       measures=["max-prob"], repeats=[2])
    with pytest.raises(SystemExit) as stop:
        ablate.main(argv)
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 3 new settings saved" in err and "rerun the same command to resume" in err
    assert len((tmp_path / "abl" / "ablation.jsonl").read_text().splitlines()) == 1



@pytest.mark.parametrize("engine", ["eager", "static"])
def test_speculative_rows_on_every_engine(tiny_checkpoint, tmp_path, engine):
    """`spec:L:K` runs on the engine asked for; its rows carry acceptance, launches per generated token and
    device-to-host reads per round (one per round without a draft threshold)."""
    argv = latency_args(tiny_checkpoint[0], tmp_path, modes=["spec:2:3", "spec:1:2:0.3"], engine=engine,
                        baselines=[])
    assert latency.main(argv) == 0
    rows = [r for r in json.loads((tmp_path / "latency.json").read_text()) if r["impl"] == "mexit"]
    assert rows and all(r["engine"] == engine for r in rows)
    for r in rows:
        assert r["launches_per_step"] > 0 and r["weight_bytes_ratio"] > 0
        assert r["acceptance_rate"] is None or 0 <= r["acceptance_rate"] <= 1  # None: nothing was drafted
        assert r["host_reads_per_round"] == 1 if r["mode"] == "spec:2:3" else r["host_reads_per_round"] >= 1


def test_speculative_sweep_rows_are_lossless_with_an_interval(tiny_checkpoint, tmp_path, prompt_file):
    """`mexit bench-speculative`: one row per (draft exit, k, threshold), each checked lossless against full depth,
    with its speed-up's 95% interval over interleaved pairs."""
    from mexit.bench import speculative_sweep

    argv = ["--model", str(tiny_checkpoint[0]), "--prompts", str(prompt_file), "--n-prompts", "2", "--draft-exits",
            "1", "2", "--draft-lens", "2", "--thresholds", "none", "--max-new-tokens", "6", "--repeats", "2",
            "--out", str(tmp_path), "--quiet"]
    assert speculative_sweep.main(argv) == 0
    rows = json.loads((tmp_path / "speculative.json").read_text())
    assert [(r["draft_exit"], r["draft_len"]) for r in rows] == [(1, 2), (2, 2)]
    for r in rows:
        assert r["lossless"] and r["speedup_lo"] <= r["speedup"] <= r["speedup_hi"]
        assert 0 <= r["acceptance_rate"] <= 1 and r["weight_bytes_ratio"] > 0
    with pytest.raises(ValueError, match="listed twice"):
        speculative_sweep.main([*argv, "--draft-lens", "2", "2"])
    acd = tmp_path / "acd"  # an ACD target: its own full-depth tokens, drafts from an exit below its lower layer
    assert speculative_sweep.main([*argv[:-3], "--out", str(acd), "--quiet", "--target", "acd:4,2", "--draft-exits",
                                   "1"]) == 0
    rows = json.loads((acd / "speculative.json").read_text())
    assert [(r["target"], r["draft_exit"], r["lossless"]) for r in rows] == [("acd:4,2", 1, True)]
    with pytest.raises(ValueError, match="--target ee:max-prob:0.5: speculative decoding verifies a fixed mode"):
        speculative_sweep.main([*argv, "--target", "ee:max-prob:0.5"])
    with pytest.raises(ValueError, match="draft_vocab needs the checkpoint's token frequencies"):
        speculative_sweep.main([*argv, "--draft-vocab", "0", "16"])
    for flag, value in (("--repeats", "1"), ("--n-prompts", "0")):  # no interval from one pair; no prompt
        bad = [*argv[: argv.index(flag) + 1], value, *argv[argv.index(flag) + 2:]]
        with pytest.raises(ValueError, match="--n-prompts must be >= 1, --max-new-tokens >= 2, --repeats >= 2"):
            speculative_sweep.main(bad)


def test_repetition_controls_reach_every_row(tiny_checkpoint, tmp_path):
    """--repetition-penalty / --no-repeat-ngram-size run in every mode and the transformers baseline (rows say so,
    the controls' launches are counted); a bad value is a named error before anything loads."""
    folder = tiny_checkpoint[0]
    common = dict(modes=["original", "ee:max-prob:0.3", "spec:2:2", "dola:high"], baselines=["transformers"])
    assert latency.main(latency_args(folder, tmp_path / "off", **common)) == 0
    assert latency.main(latency_args(folder, tmp_path / "on", **common, **{"repetition-penalty": "1.2",
                                                                          "no-repeat-ngram-size": "2"})) == 0
    off, on = (json.loads((tmp_path / name / "latency.json").read_text()) for name in ("off", "on"))
    assert {(r["impl"], r["mode"]) for r in on} == {(r["impl"], r["mode"]) for r in off}
    assert all(r["repetition_penalty"] == 1.2 and r["no_repeat_ngram_size"] == 2 for r in on)
    assert not any("repetition_penalty" in r for r in off)
    launches = {(r["mode"], r["batch"], r["prompt_len"]): r["launches_per_step"] for r in off if r["impl"] == "mexit"}
    for r in on:
        if r["impl"] == "mexit" and r["mode"] in ("original", "dola:high"):
            assert r["launches_per_step"] > launches[(r["mode"], r["batch"], r["prompt_len"])]
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 0, got -1"):
        latency.main(latency_args(folder, tmp_path / "bad", **{"no-repeat-ngram-size": "-1"}))
    assert not (tmp_path / "bad").exists()


def test_load_benchmark_smoke(tmp_path):
    from mexit.bench import load_checkpoint

    kinds = ["torch-mmap-copy", "mexit-fp16", "mexit-fp16-safetensors", "transformers-fp32"]
    assert load_checkpoint.main(["--work", str(tmp_path / "work"), "--size", "tiny", "--repeats", "1",
                                 "--kinds", *kinds, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "load_checkpoint.json").read_text(), parse_constant=pytest.fail)
    rows = {row["kind"]: row for row in report["rows"]}
    assert list(rows) == ["convert-fp16", *kinds]  # the safetensors row needs a converted folder first
    assert rows["torch-mmap-copy"]["cpu_vs_floor"] == 1 and report["meta"]["threads"] == 1
    for row in rows.values():
        assert row["wall_s"] > 0 and row["cpu_s"] >= 0 and row["user_s"] + row["sys_s"] == pytest.approx(row["cpu_s"])
        assert row["peak_anon_gb"] >= row["anon_before_gb"] > 0 and row["touch_s"] >= 0
    assert (tmp_path / "work" / "fp16-safetensors" / "model.safetensors").exists()
    assert "(the floor)" in (tmp_path / "out" / "load_checkpoint.md").read_text()


def test_cost_model_prices_the_measured_traffic_at_gpt2_medium(tiny_checkpoint, tmp_path):
    """Full depth projects to exactly 1; a learned early exit no row takes to 1 plus its predictor reads; restricted
    draft heads to their fraction of a head."""
    from mexit.bench import cost_model
    from mexit.decoding.stats import block_bytes
    from mexit.model.config import GPT2_MEDIUM_MULTIEXIT as MEDIUM

    argv = latency_args(tiny_checkpoint[0], tmp_path / "b", modes=["original", "ee:learned:1", "ee:max-prob:1"],
                        baselines=[])
    assert latency.main(argv) == 0
    assert cost_model.main([str(tmp_path / "b" / "latency.json"), "--out", str(tmp_path / "c")]) == 0
    rows = {(r["setting"], r["batch"], r["blocks_per_step"]): r
            for r in json.loads((tmp_path / "c" / "cost_model.json").read_text())}
    full = 24 * block_bytes(MEDIUM, torch.float16) + MEDIUM.vocab_size * MEDIUM.n_embd * 2
    for (mode, _, blocks), r in rows.items():
        assert blocks == 4
        if mode == "original":
            assert r["medium_ratio"] == pytest.approx(1.0)
        if mode == "ee:learned:1":  # three predictor reads (d + 1 fp32 each) besides full depth
            assert r["medium_ratio"] == pytest.approx(1 + 3 * 1025 * 4 / full)
        if mode == "ee:max-prob:1":  # three exit heads besides full depth
            assert r["medium_ratio"] == pytest.approx(1 + 3 * MEDIUM.vocab_size * MEDIUM.n_embd * 2 / full)
    assert cost_model.main([str(tmp_path / "missing.json")]) == 2
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\n\nThe cat sat on\n")
    assert ablate.main(ablate_args(tiny_checkpoint[0], tmp_path / "a", prompts, measures=["learned"], thresholds=[1.0],
                                   spec=["2:1"])) == 0
    assert cost_model.main([str(tmp_path / "a" / "ablation.jsonl"), "--out", str(tmp_path / "d")]) == 0
    projected = json.loads((tmp_path / "d" / "cost_model.json").read_text())
    assert [r["setting"] for r in projected] == ["learned 1.0 all", "speculative draft 2 k=1"]
    assert projected[0]["medium_ratio"] == pytest.approx(1 + 3 * 1025 * 4 / full)
    assert projected[1]["acceptance_rate"] is not None and projected[1]["medium_ratio"] > 0


def test_every_bench_command_loads_as_generate_does():
    """bench, ablate and bench-speculative take the same loading options with generate's defaults (cuda when there
    is one, auto backend and engine, the device's dtype) and huggingface_hub's options."""
    import argparse

    from mexit.bench import speculative_sweep
    from mexit.frontends.cli import hub_kwargs

    for module in (latency, ablate, speculative_sweep):
        p = argparse.ArgumentParser()
        module.add_arguments(p)
        args = p.parse_args(["--model", "someone/model", "--revision", "v1"])
        assert (args.device, args.dtype, args.backend, args.engine) == (None, None, "auto", "auto"), module
        assert hub_kwargs(args)["revision"] == "v1" and args.no_weight_check is False


def test_results_never_record_a_token_and_say_when_the_code_was_not_the_commit(tmp_path):
    import subprocess

    from mexit.bench.common import source_commit
    from mexit.bench.latency import redact_token

    assert redact_token(["--model", "m", "--token", "hf_SECRET", "--token=hf_X", "--repeats", "2"]) == \
        ["--model", "m", "--token", "***", "--token=***", "--repeats", "2"]
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "pkg").mkdir()
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / "bench" / "b.py").write_text("y = 1\n")
    (repo / "NOTES.md").write_text("notes\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for argv in (["init", "-q"], ["add", "."], ["commit", "-qm", "first"]):
        subprocess.run(git + argv, check=True)
    commit = source_commit(repo / "bench")
    assert commit and not commit.endswith("+dirty")
    (repo / "NOTES.md").write_text("more notes\n")  # not code
    assert source_commit(repo / "bench") == commit
    (repo / "pkg" / "a.py").write_text("x = 2\n")  # code outside the bench folder
    assert source_commit(repo / "bench") == commit + "+dirty"
