"""`mexit generate` end to end: JSON output equals the Python API; bad input exits 2 with a message."""

import json
import re

import pytest

import mexit
from mexit.__main__ import main


def run_cli(capsys, *argv):
    rc = main(["generate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("flags,kw", [
    (["--mode", "original"], {}),
    (["--mode", "exit", "--exit-layer", "3"], dict(exit_layer=3)),
    (["--mode", "contrast", "--contrast", "original,2", "--alpha", "0.2", "--min-candidates", "2"],
     dict(contrast=("original", 2), alpha=0.2, min_candidates=2)),
    (["--do-sample", "--seed", "4", "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8"],
     dict(do_sample=True, seed=4, top_k=20, top_p=0.9, temperature=0.8)),
])
def test_json_equals_api(tiny_checkpoint, capsys, flags, kw):
    folder = str(tiny_checkpoint[0])
    rc, out, _ = run_cli(capsys, "--model", folder, "--input-ids", "5,17,200", "--input-ids", "99",
                         "--max-new-tokens", "5", "--no-eos", "--json", *flags)
    assert rc == 0
    payload = json.loads(out)
    expected = mexit.load(folder).generate([[5, 17, 200], [99]], 5, eos_token_id=None, **kw)
    assert payload["tokens"] == expected.tokens and payload["text"] == expected.text
    assert payload["backend"] == "torch" and payload["engine"] == "eager"


def test_text_prompt_and_triton_backend(tiny_checkpoint, capsys):
    rc, out, _ = run_cli(capsys, "--model", str(tiny_checkpoint[0]), "--prompt", "Hello", "--max-new-tokens", "4",
                         "--backend", "triton", "--json", "--no-eos")
    assert rc == 0 and json.loads(out)["backend"] == "triton" and len(json.loads(out)["tokens"][0]) == 4


@pytest.mark.parametrize("flags,message", [
    (["--mode", "exit", "--exit-layer", "9"], "exit layer 9 is not in this checkpoint"),
    (["--mode", "contrast", "--contrast", "4,2", "--alpha", "2"], "alpha must be in"),
    (["--max-new-tokens", "100"], "exceeds the model's context"),
])
def test_bad_input_exits_2(tiny_checkpoint, capsys, flags, message):
    rc, _, err = run_cli(capsys, "--model", str(tiny_checkpoint[0]), "--input-ids", "1,2", *flags)
    assert rc == 2 and message in err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--model", str(tmp_path / "none"), "--input-ids", "1")
    assert rc == 2 and "does not exist" in err


def cli(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "hi"], "the following arguments are required: --model"),
    (["generate", "--model", "M", "--input-ids", "1", "--mode", "early-exit"], "needs --threshold"),
    (["generate", "--model", "M", "--input-ids", "1", "--mode", "early-exit", "--threshold", "0.5",
      "--decay-tau", "abc"], "argument --decay-tau: invalid float value"),
    (["generate", "--model", "M", "--input-ids", "1", "--exit-layer", "2"], "--exit-layer applies to --mode exit"),
    (["generate", "--model", "M", "--input-ids", "1", "--mode", "early-exit", "--threshold", "0.5",
      "--exits", "2,2"], "lists a layer twice"),
    (["generate", "--model", "M", "--input-ids", "1", "--threshold", "0.5"], "applies to --mode early-exit"),
    (["generate", "--model", "M", "--input-ids", "1", "--mode", "contrast", "--contrast", "4,2",
      "--min-candidates", "999"], "exceeds the vocabulary"),
    (["generate", "--model", "M", "--input-ids", "1", "--mode", "early-exit", "--threshold", "0.5",
      "--schedule", "predicated"], "static-engine schedule"),
    (["generate", "--model", "M", "--input-ids", "1", "--mode", "ee:max-prob:0.5:predicated"],
     "--mode ee:max-prob:0.5:predicated: the predicated schedule is a static-engine schedule"),
    (["generate", "--model", "M", "--input-ids", "1", "--stream", "--json"], "exclusive"),
])
def test_user_errors_are_one_line_and_exit_2(tiny_checkpoint, capsys, argv, message):
    argv = [str(tiny_checkpoint[0]) if a == "M" else a for a in argv]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_ignored_flags_warn(tiny_checkpoint, capsys):
    rc, _, err = cli(capsys, "generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "1,2", "--top-k", "5",
                     "--temperature", "0.7", "--compile", "--max-new-tokens", "2")
    assert rc == 0
    assert "warning: --temperature, --top-k unused: greedy decoding" in err
    assert "warning: compile ignored: nothing is compiled" in err


def test_version_and_help_show_defaults(capsys):
    assert main(["--version"]) == 0
    version = capsys.readouterr().out.strip()  # with the resolved versions of what mexit runs on
    assert version.startswith(f"mexit {mexit.__version__} (torch ") and ", transformers " in version
    for command in ("generate", "bench", "ablate", "train-heads"):
        assert main([command, "--help"]) == 0
        assert "(default: " in capsys.readouterr().out
    main(["bench", "--help"])
    assert "acd:UPPER,LOWER" in capsys.readouterr().out


@pytest.mark.parametrize("string,flags", [
    ("exit:2", ["--mode", "exit", "--exit-layer", "2"]),
    ("acd:4,1", ["--mode", "contrast", "--contrast", "4,1"]),
    ("dola:2,3:exit", ["--mode", "dola", "--dola-layers", "2,3", "--dola-heads", "exit"]),
    ("ee:cosine:0.5:1,2:deferred", ["--mode", "early-exit", "--threshold", "0.5", "--measure", "cosine", "--exits",
                                    "1,2", "--propagation", "deferred"]),
    ("spec:2:3", ["--mode", "speculative", "--draft-exit", "2", "--draft-len", "3"]),
    ("spec:1:2@acd:4,2", ["--mode", "speculative", "--draft-exit", "1", "--draft-len", "2", "--contrast", "4,2"]),
    # a speculative string leaves its target open
    ("spec:1:2 --contrast 4,2 --alpha 0.3", ["--mode", "speculative", "--draft-exit", "1", "--draft-len", "2",
                                            "--contrast", "4,2", "--alpha", "0.3"]),
])
def test_a_mode_string_equals_its_flags(tiny_checkpoint, capsys, string, flags):
    """--mode takes the mode strings `mexit bench --modes` takes: the same JSON (tokens, exit layers) as the flags."""
    common = ["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17,200", "--max-new-tokens", "5",
              "--no-eos", "--json"]
    rc, by_string, _ = cli(capsys, *common, "--mode", *string.split())
    rc2, by_flags, _ = cli(capsys, *common, *flags)
    assert rc == rc2 == 0
    drop = ("prefill_ms", "ms_per_token", "tokens_per_s", "early_exit")  # timings differ
    a, b = json.loads(by_string), json.loads(by_flags)
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


@pytest.mark.parametrize("argv,message", [
    (["--mode", "ee:max-prob:0.5", "--threshold", "0.3"], "carries its settings: do not pass --threshold too"),
    (["--mode", "exit:2", "--exit-layer", "3"], "carries its settings: do not pass --exit-layer too"),
    (["--mode", "beam:4"], "argument --mode: unknown mode 'beam:4'"),
    (["--mode", "spec:1:2@ee:max-prob:0.5"], r"unknown mode 'spec:1:2@ee:max-prob:0.5'; use .*\[@TARGET\]"),
    (["--mode", "spec:1:2@acd:4,2", "--contrast", "4,1"], "carries its settings: do not pass --contrast too"),
    (["--mode", "ee:max-prob:1.5"], r"threshold for max-prob must be in \[0, 1\]"),
    (["--mode", "ee:max-prob:0.5:2,2"], r"mode 'ee:max-prob:0.5:2,2': exits lists a layer twice: \[2, 2\]"),
    (["--mode", "spec:2:0", "--draft-vocab", "5"], r"mode 'spec:2:0': draft_len must be an integer >= 1"),
    (["--mode", "exit", "--exit-layer", "2", "--alpha", "0.1"], "--alpha applies to --mode contrast or speculative"),
    (["--mode", "early-exit", "--threshold", "0.5", "--exits", "2,,4"], "comma-separated integers, got '2,,4'"),
    (["--mode", "ee:max-prob:0.5", "--decay-tau", "inf"], "decay_tau must be a finite number >= 0"),
    (["--mod", "exit:2"], "unrecognized arguments: --mod"),  # no abbreviations
])
def test_a_bad_mode_string_is_named(tiny_checkpoint, capsys, argv, message):
    rc, _, err = cli(capsys, "generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5", *argv)
    assert rc == 2 and re.search(message, err), err


def test_json_is_strict_and_has_timings(tiny_checkpoint, capsys):
    rc, out, _ = cli(capsys, "generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17", "--mode",
                     "early-exit", "--threshold", "0.3", "--measure", "cosine", "--json", "--max-new-tokens", "4",
                     "--no-eos")
    assert rc == 0
    payload = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert payload["prefill_ms"] > 0 and payload["ms_per_token"] > 0 and payload["tokens_per_s"] > 0
    assert "never exited" in payload["confidences_note"] and len(payload["exit_layers"][0]) == 4


def test_stream_prints_the_generated_text(tiny_checkpoint, capsys):
    folder = str(tiny_checkpoint[0])
    rc, out, _ = cli(capsys, "generate", "--model", folder, "--prompt", "Hello", "--stream", "--max-new-tokens", "6",
                     "--no-eos")
    assert rc == 0
    assert out == mexit.load(folder).generate("Hello", 6, eos_token_id=None).text[0] + "\n"


def test_a_streamed_run_still_says_its_seed_and_what_it_saved(tiny_checkpoint, capsys):
    """--stream prints the text as it comes, then what a run without it prints after the text: the drawn seed
    (stderr) and the mode's summary."""
    folder = str(tiny_checkpoint[0])
    args = ("generate", "--model", folder, "--prompt", "Hello", "--max-new-tokens", "6", "--no-eos", "--do-sample",
            "--mode", "ee:max-prob:0.3")
    rc, streamed, err = cli(capsys, *args, "--stream")
    assert rc == 0 and "# seed " in err and "(pass --seed" in err
    seed = err.split("# seed ")[1].split()[0]
    rc, plain, _ = cli(capsys, *args, "--seed", seed)
    assert rc == 0 and streamed == plain  # the same text and the same summary lines, in the same order
    assert "# exit layers: " in streamed and "# early exit: weight reads " in streamed


def test_help_does_not_wait_for_torch():
    """`mexit ... --help` and its usage errors import neither torch nor transformers: they answer at once."""
    import subprocess
    import sys

    code = ("import sys\nfrom mexit.__main__ import main\n"
            "codes = [main(['generate', '--help']), main(['--help']), main(['bench', '--help'])]\n"
            "print(codes, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[0, 0, 0] False False")
    assert "bench-speculative" in out and "measured choice on CUDA, 64 elsewhere" in " ".join(out.split())


def test_bench_names_every_block_linear_path():
    from mexit.bench.latency import LINEARS
    from mexit.ops import LINEAR_PATHS

    assert LINEARS == list(LINEAR_PATHS)


def test_unsupported_devices_are_one_line(tiny_checkpoint, capsys):
    for device in ("tpu", "mps", "cuda:x"):
        assert main(["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "1", "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: unsupported device") and err.count("\n") == 1


def test_results_come_before_the_optional_plot(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import sys

    from mexit.bench import latency

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    argv = ["--model", str(tiny_checkpoint[0]), "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--modes",
            "original", "--baselines", "--out", str(tmp_path)]
    assert latency.main(argv) == 0
    captured = capsys.readouterr()
    assert "| mexit | original |" in captured.out
    assert "plot skipped: matplotlib is missing from this install" in captured.err
    assert (tmp_path / "latency.md").exists() and not (tmp_path / "latency.png").exists()


def test_json_says_what_a_run_read_against_the_full_model(tiny_checkpoint, capsys):
    """--json carries the weight-byte ratio against the full model (a fixed mode's too: exit 2 of 4 reads about
    half, ACD more than full depth), and for early exit what it saved: blocks and heads read per step, the exit
    histogram over the tokens."""
    base = ["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17,200", "--max-new-tokens", "6",
            "--no-eos", "--json"]

    def run(*extra):
        assert main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    assert run()["weight_bytes_ratio"] == pytest.approx(1.0)
    assert 0.3 < run("--mode", "exit", "--exit-layer", "2")["weight_bytes_ratio"] < 0.8
    assert run("--mode", "contrast", "--contrast", "4,2")["weight_bytes_ratio"] > 1.0
    out = run("--mode", "early-exit", "--threshold", "0.0", "--exits", "2")
    ee = out["early_exit"]
    assert ee["exit_histogram"] == {"2": 6} and ee["mean_exit_layer"] == 2 and ee["blocks_read_per_step"] == 2
    assert ee["weight_bytes_ratio"] == out["weight_bytes_ratio"] < 1
    assert ee["time_ratio"] is None and "--time-full-depth" in ee["time_note"]
    timed = run("--mode", "early-exit", "--threshold", "0.0", "--exits", "2", "--time-full-depth")["early_exit"]
    assert timed["timed_pairs"] == 3 and timed["time_ratio_lo"] <= timed["time_ratio"] <= timed["time_ratio_hi"]
    assert timed["ms_per_token"] > 0 and timed["full_depth_ms_per_token"] > 0  # no timed assertion beyond that
    assert main([*base[:-1], "--mode", "early-exit", "--threshold", "1.0", "--time-full-depth"]) == 0
    assert "decode time" in capsys.readouterr().out
    assert main([*base, "--time-full-depth"]) == 2
    assert "applies to --mode early-exit" in capsys.readouterr().err


def test_a_data_set_run_reports_dola_layers_and_early_exit_time(tiny_checkpoint, tmp_path, capsys):
    """A prompts-file run's rows carry DoLa's premature layers and its summary their histogram; with early exit,
    --time-full-depth times the file's first batch against full depth."""
    data = tmp_path / "data.txt"
    data.write_text("one prompt\nanother prompt here\nthird\n")
    common = ["generate", "--model", str(tiny_checkpoint[0]), "--prompts-file", str(data), "--max-new-tokens", "5",
              "--no-eos", "--batch", "2"]
    assert main([*common, "--out", str(tmp_path / "d.jsonl"), "--mode", "dola", "--dola-layers", "2,3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert all(len(r["premature_layers"]) == 5 and set(r["premature_layers"]) <= {2, 3} for r in rows)
    assert "# DoLa over the file: tokens per premature layer" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "e.jsonl"), "--mode", "early-exit", "--threshold", "0.5",
                 "--time-full-depth"]) == 0
    out = capsys.readouterr().out
    assert "# early exit over the file" in out
    assert "against full depth (the file's first batch of good prompts): decode time" in out


def test_a_flag_that_would_be_dropped_is_refused(tiny_checkpoint, capsys):
    """`mexit layers` reads one prompt: a second --prompt is an error, not a silent replacement; --batch belongs
    to --prompts-file."""
    model = ["--model", str(tiny_checkpoint[0])]
    assert main(["layers", *model, "--input-ids", "1,2", "--input-ids", "3"]) == 2
    assert "--input-ids was given twice" in capsys.readouterr().err
    assert main(["generate", *model, "--input-ids", "1,2", "--batch", "4"]) == 2
    assert "--batch goes with --prompts-file" in capsys.readouterr().err


def test_several_prompts_print_apart(tiny_checkpoint, capsys):
    """A text spans lines: with several prompts each row's output follows a `# row N: prompt` line."""
    assert main(["generate", "--model", str(tiny_checkpoint[0]), "--prompt", "a b", "--prompt", "c",
                 "--max-new-tokens", "3", "--no-eos"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# row 0: 'a b'" and "# row 1: 'c'" in out
    assert main(["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "1,2", "--input-ids", "3",
                 "--max-new-tokens", "2", "--no-eos"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "# row 0"


def test_speculative_summary_names_what_its_ratio_is_against(tiny_checkpoint, capsys):
    """Speculation saves against its target (here exit 4 decoding alone), not against the full model."""
    assert main(["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17,200", "--mode", "spec:2:2@exit:4",
                 "--max-new-tokens", "6", "--no-eos"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("# speculative:")][0]
    assert "x of its target's (the verifying mode decoding alone)" in line and "full depth" not in line
