"""`mexit train-heads`: heads learn on a frozen base, the output loads in mexit with the exact exit semantics,
resume continues, Ctrl-C saves, and bad input fails before any work."""

import json
import shutil

import pytest
import torch
from hf_reference import hf_block_outputs
from tiny_checkpoints import make_hf_checkpoint

import mexit
from mexit.frontends.cli import main
from mexit.training.common import TrainingDiverged, TrainingInterrupted
from mexit.training.heads import HeadTrainingConfig, train_heads

TEXT = "".join(f"The {w} of the {v} is {u}, and the {v} is not {w}.\n"
               for w in ("king", "queen", "sea", "night", "day", "lord") for v in ("house", "storm", "field")
               for u in ("old", "young", "cold"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A plain GPT-2 (no exits) with a byte-level tokenizer, and a small text file."""
    folder = tmp_path_factory.mktemp("base")
    hf, _ = make_hf_checkpoint(folder, exits=(), scale=0.1)
    data = folder.parent / "text.txt"
    data.write_text(TEXT * 2)
    return folder, hf, data


def config(base, out, **kw):
    folder, _, data = base
    return HeadTrainingConfig(**{**dict(model=str(folder), data=[str(data)], out=str(out), exits=(2, 4), seq_len=32,
                                        batch_size=4, steps=40, lr=5e-3, progress=False), **kw})


def test_heads_learn_and_load_with_exit_semantics(base, tmp_path):
    folder, hf, _ = base
    report = train_heads(config(base, tmp_path / "out"))
    for layer in ("2", "4"):
        assert report["eval"][layer]["loss"] < report["eval_start"][layer]["loss"] - 0.1
    assert report["eval"]["original"]["loss"] == report["eval_start"]["original"]["loss"]  # the base is frozen
    assert report["training"]["tokens_per_s"] > 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["lm_head_layer_indices"] == [2, 4]
    assert (tmp_path / "out" / "tokenizer_config.json").exists() and (tmp_path / "out" / "train_report.md").exists()
    lm = mexit.load(tmp_path / "out")
    assert lm.config.exit_layers == (2, 4) and lm.tokenizer is not None
    ids = torch.tensor([[5, 17, 200, 3, 9]])
    outputs = hf_block_outputs(hf, ids)  # transformers' own hidden states of the untouched base
    cache = lm.model.new_cache(1, 5)
    cache.valid.fill_(True)
    for layer in (2, 4):
        with torch.no_grad():
            want = hf.transformer.ln_f(outputs[layer]) @ lm.model.w.exit_heads[layer].T
        got = lm.model.head_logits(lm.model.run_layers(lm.model.embed(ids, torch.arange(5)[None]), 0, layer,
                                                       cache, 0), layer)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(lm.model.w.fc_w[1].T, hf.transformer.h[1].mlp.c_fc.weight)  # the base is unchanged


def test_resume_continues_from_the_saved_step(base, tmp_path):
    full = train_heads(config(base, tmp_path / "full", steps=12))
    train_heads(config(base, tmp_path / "half", steps=12, save_every=6))
    state = torch.load(tmp_path / "half" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 12
    # simulate a stop at step 6: train 6 steps of the same 12-step schedule, then resume
    interrupted = config(base, tmp_path / "resumed", steps=12, save_every=6)
    calls = {"n": 0}
    import mexit.training.heads as th

    original_step = th.HeadTrainer.step

    def stop_after_six(self, blocks):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original_step(self, blocks)

    th.HeadTrainer.step = stop_after_six
    try:
        with pytest.raises(TrainingInterrupted, match="interrupted at step 6 of 12.*--resume"):
            train_heads(interrupted)
    finally:
        th.HeadTrainer.step = original_step
    assert torch.load(tmp_path / "resumed" / "trainer_state.pt", weights_only=True)["step"] == 6
    resumed = train_heads(config(base, tmp_path / "resumed", steps=12, resume=True))
    for layer in ("2", "4"):
        assert resumed["eval"][layer]["loss"] == pytest.approx(full["eval"][layer]["loss"], abs=1e-5)


def test_a_resume_keeps_the_interrupted_evaluation_and_refuses_changed_settings(base, tmp_path, monkeypatch):
    """Ctrl-C during the held-out evaluation of step 6: the resumed run evaluates step 6 first, so its history
    equals an uninterrupted run's; the report says where it resumed. A resume that changes a setting of the steps
    (lr, batch size, seed, ...) is refused by name instead of being ignored."""
    import mexit.training.heads as th

    straight = train_heads(config(base, tmp_path / "straight", steps=9, eval_every=3))
    assert [h["step"] for h in straight["history"]] == [3, 6]
    original, calls = th.HeadTrainer.evaluate, []

    def interrupt_the_second(self, blocks, batch):  # calls: the start, step 3, step 6
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, blocks, batch)

    monkeypatch.setattr(th.HeadTrainer, "evaluate", interrupt_the_second)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 6 of 9"):
        train_heads(config(base, tmp_path / "cut", steps=9, eval_every=3))
    monkeypatch.setattr(th.HeadTrainer, "evaluate", original)
    other_text = tmp_path / "other.txt"
    other_text.write_text(TEXT[::-1] * 2)
    other_base = tmp_path / "other_base"  # the same tokenizer, another checkpoint
    shutil.copytree(base[0], other_base)
    for change, message in ((dict(model=str(other_base)), f"trained with --model '{base[0].resolve()}', this run "
                                                           f"gives '{other_base.resolve()}'"),
                            (dict(lr=1e-2), r"trained with --lr 0\.005, this run gives 0\.01: resume with the "
                                            r"run's settings \(the length \(--steps / --epochs\), --device, "),
                            (dict(batch_size=2), "trained with --batch-size 4, this run gives 2"),
                            (dict(seed=1), "trained with --seed 0, this run gives 1"),
                            (dict(data=[str(other_text)]), r"trained with other training data \(token blocks "),
                            (dict(eval_fraction=0.2), "trained with other training data")):
        with pytest.raises(ValueError, match=message):
            train_heads(config(base, tmp_path / "cut", steps=9, eval_every=3, resume=True, **change))
    # the same run however its paths and exits are spelled (here: the data through a relative path, exits reordered)
    monkeypatch.chdir(base[2].parent)
    resumed = train_heads(config(base, tmp_path / "cut", steps=9, eval_every=3, resume=True, save_every=2,
                                 data=[base[2].name], exits=(4, 2)))
    assert resumed["history"] == straight["history"] and resumed["eval"] == straight["eval"]
    assert resumed["training"]["resumed_at"] == [6] and straight["training"]["resumed_at"] == []
    assert "resumed at step 6." in (tmp_path / "cut" / "train_report.md").read_text()


def test_init_zero_and_bf16(base, tmp_path):
    report = train_heads(config(base, tmp_path / "zero", init="zero", steps=5, dtype="bf16"))
    assert report["eval_start"]["2"]["loss"] == pytest.approx(torch.log(torch.tensor(257.0)).item(), abs=1e-3)
    assert report["eval"]["2"]["loss"] < report["eval_start"]["2"]["loss"]


@pytest.mark.parametrize("change,message", [
    (dict(data=["/nonexistent.txt"]), "data file /nonexistent.txt does not exist"),
    (dict(exits=(0, 5)), r"exits \[0, 5\] are outside 1..n_layer=4"),
    (dict(seq_len=1000), "seq_len must be in 2..64"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(eval_max_blocks=0), "eval_max_blocks must be >= 1, got 0"),
    (dict(eval_max_blocks=-1), "eval_max_blocks must be >= 1, got -1"),
    (dict(eval_every=-1), "eval_every must be >= 0, got -1"),
    (dict(save_every=-5), "save_every must be >= 0"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0, got -1"),
    (dict(steps=None, epochs=float("inf")), "epochs finite and > 0, got steps None, epochs inf"),
    (dict(lr=float("inf")), "lr must be > 0 and at most 1000 .* got inf"),
    (dict(lr=1e300), "lr must be > 0 and at most 1000"),  # the optimizer's step would overflow
    (dict(weight_decay=float("inf")), "weight_decay must be finite and >= 0, got inf"),
    (dict(weight_decay=-0.1), "weight_decay must be finite and >= 0, got -0.1"),
    (dict(resume=True, overwrite=True), "--resume continues the saved run and --overwrite replaces it: pass one"),
])
def test_bad_input_fails_before_work(base, tmp_path, change, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_heads(config(base, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def test_a_run_that_diverges_stops_and_writes_nothing(base, tmp_path, capsys, diverging_updates):
    """An update that leaves inf in the heads stops the run: after the last step before the checkpoint and report
    are written; before it at the next step, whose loss is not finite. One error line from the CLI."""
    with pytest.raises(TrainingDiverged, match="trained heads hold NaN or inf after step 1: the run diverged"):
        train_heads(config(base, tmp_path / "one", steps=1))
    assert not (tmp_path / "one" / "train_report.json").exists()
    with pytest.raises(TrainingDiverged, match=r"the training loss at step 2 is not finite \(\{2: nan, 4: "):
        train_heads(config(base, tmp_path / "two", steps=4))
    assert not (tmp_path / "two" / "train_report.json").exists()
    capsys.readouterr()
    folder, _, data = base
    assert main(["train-heads", "--model", str(folder), "--data", str(data), "--exits", "2", "--seq-len", "32",
                 "--steps", "1", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err  # the progress bar, then the error line
    assert "Traceback" not in err and err.count("error: ") == 1
    assert err.strip().splitlines()[-1].startswith("error: the trained heads hold NaN or inf after step 1")


def test_cli_errors(base, tmp_path, capsys):
    folder, _, data = base
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    no_tokenizer = tmp_path / "bare"
    make_hf_checkpoint(no_tokenizer, exits=(), with_tokenizer=False)
    capsys.readouterr()
    cases = [
        (["--model", str(folder), "--data", str(empty)], "is empty"),
        (["--model", str(folder), "--data", str(data), "--out", str(existing)], "pass --overwrite"),
        (["--model", str(no_tokenizer), "--data", str(data)], "has no tokenizer files"),
        (["--model", str(folder), "--data", str(data), "--exits", "9"], "outside 1..n_layer=4"),
    ]
    for argv, message in cases:
        args = ["train-heads", "--exits", "2", "--seq-len", "32", "--out", str(tmp_path / "new"), *argv]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert (existing / "keep.txt").exists() and not (tmp_path / "new").exists()
    assert main(["train-heads", "--model", str(folder), "--data", str(data), "--exits", "2,3", "--out",
                 str(tmp_path / "cli"), "--seq-len", "32", "--batch-size", "4", "--steps", "3"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    assert mexit.load(tmp_path / "cli").config.exit_layers == (2, 3)


def test_defaults_fit_the_model_and_resume_extends(base, tmp_path, capfd):
    """The tiny base has 64 positions: the default sequence length is its context (not 512); tokenizing whole
    files prints no maximum-length warning; a resumed run may ask for more steps (the schedule is stretched)."""
    report = train_heads(config(base, tmp_path / "out", seq_len=None, steps=2))
    assert report["training"]["seq_len"] == 64
    assert "longer than the specified maximum" not in capfd.readouterr().err
    with pytest.warns(UserWarning, match="2 steps extended to 4"):
        extended = train_heads(config(base, tmp_path / "out", seq_len=None, steps=4, resume=True))
    assert extended["training"]["steps"] == 4
    with pytest.raises(ValueError, match="past this run's 3 steps"):
        train_heads(config(base, tmp_path / "out", seq_len=None, steps=3, resume=True))


@pytest.mark.parametrize("command", ["train-heads", "train-exit-predictors"])
def test_eval_fraction_beside_eval_data_is_refused(base, tmp_path, capsys, command):
    """--eval-data replaces the held-out share of --data: a --eval-fraction given with it would do nothing."""
    folder, _, data = base
    argv = [command, "--model", str(folder), "--data", str(data), "--eval-data", str(data), "--eval-fraction", "0.2",
            "--exits", "2", "--steps", "1"] + (["--out", str(tmp_path / "out")] if command == "train-heads" else [])
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --eval-fraction holds out a share of --data; with --eval-data")


def test_an_output_path_that_is_a_file_is_one_line(base, tmp_path, capsys):
    folder, _, data = base
    (tmp_path / "a.txt").write_text("x")
    assert main(["train-heads", "--model", str(folder), "--data", str(data), "--exits", "2", "--steps", "1", "--out",
                 str(tmp_path / "a.txt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: output folder {tmp_path / 'a.txt'} is a file")


@pytest.mark.parametrize("change,message", [(dict(steps=2.5), r"steps must be a whole number, got 2\.5"),
                                            (dict(batch_size=True), "batch_size must be a whole number, got True")])
def test_a_count_of_another_type_is_named(base, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train_heads(config(base, tmp_path / "out", **change))


def test_one_data_path_as_a_string_is_named(base, tmp_path):
    with pytest.raises(ValueError, match=r"data is a list of text files, got one path '.*text.txt': pass \["):
        train_heads(config(base, tmp_path / "out", data=str(base[2])))


def test_a_warmup_longer_than_the_run_is_refused(base, tmp_path):
    with pytest.raises(ValueError, match=r"--warmup-steps 10 exceeds the run's 2 steps: the learning rate would never"):
        train_heads(config(base, tmp_path / "out", steps=2, warmup_steps=10))
