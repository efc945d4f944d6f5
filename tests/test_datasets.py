"""`mexit generate --prompts-file`: results in input order, one JSON line per prompt, the same whatever the batch
size or resume point, greedy and seeded sampling; text and JSONL inputs; a rerun resumes."""

import json
import re
from contextlib import nullcontext
from pathlib import Path

import pytest

import mexit
from mexit.frontends.cli import main
from mexit.frontends.datasets import generate_file, settings_path

SMALL = Path(__file__).resolve().parents[1] / "bench" / "small_model"
PROMPTS = ["ROMEO. But soft, what light", "KING. Now, my lords,", "HAMLET. I have", "JULIET. O Romeo,",
           "MACBETH. Is this", "LEAR. Blow, winds,", "OTHELLO. It is the cause"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("sample", [False, True])
def test_batched_resumed_and_single_runs_agree(tmp_path, sample):
    lm = mexit.load(SMALL)
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n")
    kw = dict(max_new_tokens=8, eos_token_id=None, do_sample=sample or None, progress=False)
    generate_file(lm, source, tmp_path / "b3.jsonl", batch=3, seed=11, **kw)
    generate_file(lm, source, tmp_path / "b1.jsonl", batch=1, seed=11, **kw)
    want = rows(tmp_path / "b3.jsonl")
    assert [r["index"] for r in want] == list(range(len(PROMPTS))) and [r["prompt"] for r in want] == PROMPTS
    assert rows(tmp_path / "b1.jsonl") == want
    partial = tmp_path / "resumed.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in want[:4]))  # a run stopped after 4 prompts
    settings_path(partial).write_text(settings_path(tmp_path / "b3.jsonl").read_text())  # and its record
    summary = generate_file(lm, source, partial, batch=2, seed=11, **kw)
    assert summary["skipped"] == 4 and summary["written"] == 3 and rows(partial) == want
    alone = lm.generate([PROMPTS[5]], 8, eos_token_id=None, do_sample=sample or None, seed=11 + 5 if sample else None)
    assert want[5]["tokens"] == alone.tokens[0]  # row i's seed is seed + i


def test_jsonl_input_and_cli(tmp_path, capsys):
    lm = mexit.load(SMALL)
    ids = lm.encode(PROMPTS[1])[0]
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": PROMPTS[0]}) + "\n" + json.dumps({"input_ids": ids}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(SMALL), "--prompts-file", str(source), "--out", str(out),
                 "--max-new-tokens", "6", "--no-eos"]) == 0
    assert "wrote" in capsys.readouterr().out
    got = rows(out)
    assert got[0]["id"] == "a" and got[1]["input_ids"] == ids
    assert [r["tokens"] for r in got] == lm.generate([PROMPTS[0], PROMPTS[1]], 6, eos_token_id=None).tokens
    source.write_text(json.dumps({"text": "x"}) + "\n")
    assert main(["generate", "--model", str(SMALL), "--prompts-file", str(source), "--out", str(tmp_path / "x")]) == 2
    assert "either \"prompt\" or \"input_ids\"" in capsys.readouterr().err
    assert main(["generate", "--model", str(SMALL), "--prompts-file", str(source)]) == 2
    assert "needs --out" in capsys.readouterr().err


def test_every_prompt_is_checked_before_work_and_named_by_line(tmp_path, capsys):
    """A too-long prompt on line 37 (and an empty JSON prompt) refuse the file before anything is generated; with
    --skip-bad-prompts they are rows holding "error", in input order, and the others are generated."""
    source = tmp_path / "prompts.txt"
    lines = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(40)]
    lines[36] = "word " * 300  # line 37: longer than the model's context with the new tokens
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(SMALL), "--prompts-file", str(source), "--out", str(out),
            "--max-new-tokens", "4", "--batch", "16"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "line 37:" in err and "nothing was generated" in err and "--skip-bad-prompts" in err
    assert not out.exists()
    assert main(args + ["--skip-bad-prompts"]) == 0
    assert "1 bad prompt(s) written as errors" in capsys.readouterr().out
    got = rows(out)
    assert [r["index"] for r in got] == list(range(40)) and [r["line"] for r in got] == list(range(1, 41))
    assert "error" in got[36] and "tokens" not in got[36] and all("tokens" in r for r in got[:36] + got[37:])
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + json.dumps({"input_ids": []}) + "\n")
    assert main(args[:4] + [str(jsonl), "--out", str(tmp_path / "bad_out.jsonl")]) == 2
    assert "line 2: empty prompt" in capsys.readouterr().err
    timed = ["--skip-bad-prompts", "--mode", "early-exit", "--threshold", "0.5", "--exits", "2", "--time-full-depth"]
    assert main(args[:4] + [str(jsonl), "--out", str(tmp_path / "timed.jsonl"), "--max-new-tokens", "3", *timed]) == 0
    assert "first batch of good prompts): decode time" in capsys.readouterr().out  # the bad line is not timed


@pytest.mark.parametrize("line,message", [
    ('{"prompt": 5}', r'line 2: "prompt" is text \(a JSON string\), got 5'),
    ('{"prompt": null}', r'line 2: "prompt" is text \(a JSON string\), got null'),
    ('{"prompt": {"a": 1}}', r'line 2: "prompt" is text'),
    ('{"input_ids": [[1, 2]]}', r'line 2: "input_ids" is one list of integer token ids, got \[\[1, 2\]\]'),
    ('{"input_ids": 7}', r'line 2: "input_ids" is one list'),
    ('{"prompt": "hi", "id": {"x": NaN}}', "line 2 is not strict JSON: NaN is not a JSON value"),
])
def test_a_wrongly_typed_json_line_is_named_before_anything_is_written(tmp_path, capsys, line, message):
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + line + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(SMALL), "--prompts-file", str(source), "--out", str(out),
                 "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source} ") and err.count("\n") == 1 and re.search(message, err), err
    assert not list(tmp_path.glob("out*"))  # nothing written


def test_resume_under_other_settings_is_refused(tmp_path, capsys):
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(SMALL), "--prompts-file", str(source), "--out", str(out), "--no-eos"]
    assert main(args + ["--max-new-tokens", "4"]) == 0
    settings = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert settings["generate"]["max_new_tokens"] == 4 and settings["dtype"] == "float32" and settings["versions"]
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))  # a run stopped after 3 prompts
    assert main(args + ["--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens=4" in err and "max_new_tokens=5" in err and "another --out" in err
    assert main(args + ["--max-new-tokens", "4", "--mode", "exit", "--exit-layer", "2"]) == 2
    assert "exit_layer" in capsys.readouterr().err
    record = tmp_path / "out.jsonl.settings.json"
    earlier = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in earlier.items() if k != "record"}))  # an earlier mexit's form
    assert main(args + ["--max-new-tokens", "4"]) == 2
    assert "recorded by an earlier mexit, in another form (record 1, now 3)" in capsys.readouterr().err
    record.unlink()  # a lost record: the rows' settings are unknown
    assert main(args + ["--max-new-tokens", "4"]) == 2
    assert "no settings record" in capsys.readouterr().err and not record.exists()
    record.write_text(json.dumps(earlier))
    assert main(args[:-1] + ["--max-new-tokens", "4"]) == 2  # the rows have no stop id; this run would stop at eos
    assert "eos_token_id=None, this run asks eos_token_id left to its default" in capsys.readouterr().err
    assert len(rows(out)) == 3  # nothing was added under the other settings
    assert main(args + ["--max-new-tokens", "4"]) == 0 and len(rows(out)) == len(PROMPTS)
    capsys.readouterr()
    early = ["--mode", "early-exit", "--threshold", "0.0", "--exits", "4", "--max-new-tokens", "3"]
    assert main(args[:-3] + ["--out", str(tmp_path / "ee.jsonl"), "--no-eos", *early]) == 0
    assert f"mean exit layer 4.00; tokens per exit layer {{'4': {3 * len(PROMPTS)}}}" in capsys.readouterr().out


def test_a_file_cut_at_any_byte_resumes_to_the_same_file(tmp_path):
    """A kill, an out-of-memory or a full disk can cut the output anywhere: the partial last line is dropped (with a
    warning) and redone, and the resumed file equals the uninterrupted one."""
    lm = mexit.load(SMALL)
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS[:4]) + "\n")
    full = tmp_path / "full.jsonl"
    generate_file(lm, source, full, batch=2, max_new_tokens=3, eos_token_id=None, progress=False)
    text = full.read_text()
    first_end = text.index("\n") + 1
    for cut in (1, first_end - 1, first_end, first_end + 7, len(text) - 2, len(text) - 1):
        out = tmp_path / f"cut{cut}.jsonl"
        out.write_text(text[:cut])
        (tmp_path / f"cut{cut}.jsonl.settings.json").write_text((tmp_path / "full.jsonl.settings.json").read_text())
        with pytest.warns(UserWarning, match="partial last line") if text[cut - 1] != "\n" else nullcontext():
            generate_file(lm, source, out, batch=2, max_new_tokens=3, eos_token_id=None, progress=False)
        assert out.read_text() == text, cut


def test_prompts_kept_exactly_and_json_lines_recognised_by_content(tmp_path):
    from mexit.frontends.datasets import read_prompt_file

    text = tmp_path / "prompts.txt"
    text.write_text("  leading and trailing  \n\n{not json\nlast")
    assert [(r["line"], r["prompt"]) for r in read_prompt_file(text)] == [(1, "  leading and trailing  "),
                                                                         (3, "{not json"), (4, "last")]
    objects = tmp_path / "objects.txt"
    objects.write_text('{"prompt": "a"}\n\n{"input_ids": [1, 2], "id": 7}\n')
    assert read_prompt_file(objects) == [{"index": 0, "line": 1, "prompt": "a"},
                                         {"index": 1, "line": 3, "id": 7, "input_ids": [1, 2]}]


def test_ctrl_c_says_what_was_saved(tmp_path, capsys, monkeypatch):
    from mexit.frontends import datasets

    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    real = datasets.generate_rows
    calls = []

    def interrupted_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "generate_rows", interrupted_after_one_batch)
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", str(SMALL), "--prompts-file", str(source), "--out", str(out), "--batch", "2",
              "--max-new-tokens", "3"])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "\nerror: interrupted: 2 new row(s) saved" in err and "rerun the same command" in err  # after the bar
    assert "Traceback" not in err and len(rows(out)) == 2


def test_the_check_counts_the_new_tokens_generate_will_use(tmp_path, capsys):
    """No --max-new-tokens and no generation_config value: generate's default (32) is what the check adds to a
    prompt, and what the settings record; a prompt that fits alone but not with them is refused up front."""
    from mexit.model.generation_config import DEFAULT_MAX_NEW_TOKENS

    lm = mexit.load(SMALL)
    source = tmp_path / "prompts.jsonl"
    long = [5] * (lm.config.n_positions - 10)  # fits the context alone, not with 32 new tokens
    source.write_text(json.dumps({"input_ids": [5, 6]}) + "\n" + json.dumps({"input_ids": long}) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"line 2: .*exceed"):
        generate_file(lm, source, out, progress=False)
    assert not out.exists()
    generate_file(lm, source, out, progress=False, skip_bad=True)
    settings = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert settings["generate"]["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS and "error" in rows(out)[1]


def test_resume_after_the_checkpoints_generation_defaults_changed_is_refused(tmp_path, capsys):
    """The stop ids and sampling that generation_config.json fills in are part of the record: a resume under
    other defaults is refused by name, not run with the new ones."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(SMALL, model)
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(model), "--prompts-file", str(source), "--out", str(out), "--max-new-tokens",
            "3"]
    assert main(args) == 0
    assert json.loads(settings_path(out).read_text())["defaults"] == mexit.load(model).defaults
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:2]))
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(dict(config, eos_token_id=7)))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "generation_config.json defaults" in err and "'eos_token_id': 7" in err and len(rows(out)) == 2
