"""`mexit generate` end to end: JSON output equals the Python API; bad input exits 2 with a message."""

import json

import pytest

import mexit
from mexit.cli import main


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
