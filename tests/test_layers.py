"""Per-layer predictions (`lm.layer_predictions`, `mexit layers`) against transformers' hidden states."""

import json
import subprocess
import sys

import pytest
import torch
from hf_reference import hf_block_outputs, hf_head_logits

import mexit
from mexit.frontends.cli import main


def test_equal_log_softmax_of_each_head_on_transformers_hidden_states(tiny_checkpoint):
    folder, hf, heads = tiny_checkpoint
    lm = mexit.load(folder, dtype="fp32", backend="torch")
    prompts = [[5, 17, 200, 3, 99, 12], [42]]
    predictions = lm.layer_predictions(prompts, top_k=4)
    assert len(predictions) == 2
    for ids, pred in zip(prompts, predictions):
        outputs = hf_block_outputs(hf, torch.tensor([ids]))
        assert pred.heads == [*lm.config.exit_layers, "original"] and pred.input_ids == ids
        assert pred.tokens.shape == pred.logprobs.shape == (len(pred.heads), len(ids), 4)
        assert pred.entropy.shape == (len(pred.heads), len(ids)) and pred.logprobs.dtype == torch.float32
        for h, head in enumerate(pred.heads):
            reference = torch.log_softmax(hf_head_logits(hf, heads, outputs, head)[0].double(), dim=-1)  # [T, V]
            top = reference.topk(4, dim=-1)
            assert torch.equal(pred.tokens[h], top.indices), head
            torch.testing.assert_close(pred.logprobs[h].double(), top.values, atol=2e-5, rtol=0)
            entropy = -(reference.exp() * reference).sum(-1)
            torch.testing.assert_close(pred.entropy[h].double(), entropy, atol=2e-5, rtol=0)


def test_padded_rows_with_their_attention_mask_are_their_tokens(tiny_checkpoint):
    """A [B, T] tensor padded left or right: each row's predictions are those of its tokens alone."""
    lm = mexit.load(tiny_checkpoint[0], dtype="fp32", backend="torch")
    rows = [[5, 17, 200, 3], [42, 7]]
    want = lm.layer_predictions(rows, top_k=3)
    ids = torch.tensor([[5, 17, 200, 3], [0, 0, 42, 7], [42, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    got = lm.layer_predictions(ids, top_k=3, attention_mask=mask)
    for pred, ref in zip(got, [want[0], want[1], want[1]]):
        assert pred.input_ids == ref.input_ids
        assert torch.equal(pred.tokens, ref.tokens) and torch.equal(pred.logprobs, ref.logprobs)
    with pytest.raises(ValueError, match="does not match the ids"):
        lm.layer_predictions(ids, attention_mask=mask[:2])


def test_cli_table_json_and_plot(tiny_checkpoint, tmp_path, capsys):
    folder = str(tiny_checkpoint[0])
    assert main(["layers", "--model", folder, "--prompt", "Hello world", "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    positions = len(out["input_ids"])
    assert out["heads"][-1] == "original" and len(out["token_text"]) == len(out["heads"])
    assert all(len(head) == positions and all(len(cell) == 3 for cell in head) for head in out["logprobs"])
    plot = tmp_path / "plots" / "l.png"  # a folder that does not exist yet is made, as --out does
    assert main(["layers", "--model", folder, "--input-ids", "5,6,7", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "original |" in text and "exit 2 |" in text and plot.stat().st_size > 10_000
    for argv, needle in ((["--prompt", "Hi", "--top-k", "0"], "top_k must be an int in 1.."),
                         (["--input-ids", ",".join(["1"] * 300)], "exceeds the context")):
        assert main(["layers", "--model", folder, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    for option in (["--engine", "static"], ["--compile"], ["--backend", "triton"], ["--pdl"]):  # one forward pass:
        assert main(["layers", "--model", folder, "--prompt", "Hi", *option]) == 2  # no decode step to configure
        assert f"unrecognized arguments: {option[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("top_k", [1.5, "3", None, True, 0])
def test_top_k_of_another_type_is_a_named_error(tiny_checkpoint, top_k):
    lm = mexit.load(tiny_checkpoint[0], dtype="fp32")
    with pytest.raises(ValueError, match=r"top_k must be an int in 1\.\.\d+, got "):
        lm.layer_predictions("Hello", top_k=top_k)


def test_numpy_and_torch_integers_are_taken_as_top_k(tiny_checkpoint):
    import numpy as np

    lm = mexit.load(tiny_checkpoint[0], dtype="fp32")
    want = lm.layer_predictions("Hello", top_k=3)[0].tokens
    for k in (np.int64(3), torch.tensor(3)):
        assert torch.equal(lm.layer_predictions("Hello", top_k=k)[0].tokens, want)


def test_a_too_long_text_prompt_is_one_error_line(tiny_checkpoint):
    """The tokenizer's own warning about a sequence longer than the model (printed by transformers' logger, before
    mexit's check) is not printed: mexit's error line says it."""
    done = subprocess.run([sys.executable, "-m", "mexit", "layers", "--model", str(tiny_checkpoint[0]), "--prompt",
                           "Hello world. " * 40], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: the prompt (") and done.stderr.count("\n") == 1, \
        done.stderr


def test_a_long_prompt_wraps_in_the_table_and_the_plot(tiny_checkpoint, tmp_path, capsys):
    """60 positions: table blocks of 10 positions (lines stay short), plot panels of 32 (the image stays narrow)."""
    import matplotlib.image

    ids = ",".join(str(5 + i % 200) for i in range(60))
    plot = str(tmp_path / "l.png")
    assert main(["layers", "--model", str(tiny_checkpoint[0]), "--input-ids", ids, "--plot", plot]) == 0
    out = capsys.readouterr().out
    assert "50..59 |" in out and max(map(len, out.splitlines())) < 200
    height, width = matplotlib.image.imread(tmp_path / "l.png").shape[:2]
    assert width < 3500 and height > width / 4  # two panels stacked, not one 60-column strip
