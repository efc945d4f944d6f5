"""`mexit generate --prompts-file`: results in input order, one JSON line per prompt, the same whatever the batch
size or resume point, greedy and seeded sampling; text and JSONL inputs; a rerun resumes."""

import json
from pathlib import Path

import pytest

import mexit
from mexit.frontends.cli import main
from mexit.frontends.datasets import generate_file

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
