"""Learned exit predictors: `mexit train-exit-predictors` learns CALM's consistency oracle (labels checked against
transformers' own hidden states), reports calibration, resumes exactly, refuses bad input; the stored file loads
with the checkpoint and travels with it; `--measure learned` reads d + 1 weights per check (exact bytes)."""

import json
import math
import shutil

import pytest
import torch
from hf_reference import hf_block_outputs
from safetensors.torch import load_file, save_file
from tiny_checkpoints import make_hf_checkpoint, write_predictors

import mexit
from mexit.decoding.early_exit import ExitPolicy
from mexit.frontends.cli import main
from mexit.kernels.exit_decide_ref import probe_confidence
from mexit.model.predictors import PREDICTOR_FILE
from mexit.training.common import TrainingDiverged, TrainingInterrupted
from mexit.training.predictors import PredictorTrainingConfig, calibration, train_exit_predictors

TEXT = "".join(f"The {w} of the {v} is {u}, and the {v} is not {w}.\n"
               for w in ("king", "queen", "sea", "night", "day", "lord") for v in ("house", "storm", "field")
               for u in ("old", "young", "cold"))


@pytest.fixture()
def folder(tmp_path):
    """A multi-exit checkpoint (exits 1..4 of 4 layers) without predictors, and a text file."""
    path = tmp_path / "model"
    hf, _ = make_hf_checkpoint(path)
    (tmp_path / "text.txt").write_text(TEXT * 2)
    return path, hf, tmp_path / "text.txt"


def config(folder, **kw):
    path, _, data = folder
    return PredictorTrainingConfig(**{**dict(model=str(path), data=[str(data)], seq_len=32, batch_size=4, steps=30,
                                             progress=False), **kw})


def test_labels_are_the_consistency_oracle_and_the_file_loads(folder):
    path, hf, data = folder
    report = train_exit_predictors(config(folder, eval_fraction=0.2))
    assert report["exits"] == [1, 2, 3] and report["final_head"] == "original"
    lm = mexit.load(path, backend="torch")
    assert lm.model.predictors.layers == (1, 2, 3) and lm.model.predictors.weight.shape == (3, lm.config.n_embd)
    # the held-out labels recomputed from transformers' hidden states: exit L's argmax == the original head's
    from transformers import AutoTokenizer

    from mexit.training.common import token_blocks

    blocks = token_blocks(AutoTokenizer.from_pretrained(path), [str(data)], 32)
    held_out = blocks[-max(1, int(len(blocks) * 0.2)):]
    final = hf(held_out).logits.argmax(-1)
    outputs = hf_block_outputs(hf, held_out)
    for layer in (1, 2, 3):
        with torch.no_grad():
            exit_top1 = (hf.transformer.ln_f(outputs[layer]) @ lm.model.w.exit_heads[layer].T).argmax(-1)
        rate = (exit_top1 == final).double().mean().item()
        assert report["eval"][str(layer)]["base_rate"] == pytest.approx(rate, abs=1e-9), layer
        assert report["eval"][str(layer)]["log_loss"] < math.log(2) - 0.01  # learned at least the base rate
        assert 0 <= report["eval"][str(layer)]["ece"] <= 1
    assert (path / "exit_predictors_report.md").read_text().startswith("# train-exit-predictors report")
    json.loads((path / "exit_predictors_report.json").read_text())  # strict JSON (no NaN)
    # the predictor's confidence is the stored formula
    h = torch.randn(5, lm.config.n_embd)
    p = lm.model.predictors
    x = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(probe_confidence(h, *p.probe(2)), torch.sigmoid(x @ p.weight[1] + p.bias[1]))


def test_calibration_metrics_by_their_definitions():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200, generator=g, dtype=torch.float64)
    y = (torch.rand(200, generator=g, dtype=torch.float64) < p).double()
    m = calibration(p, y)
    pos, neg = p[y == 1], p[y == 0]
    pairs = (pos[:, None] > neg[None]).double().sum() + 0.5 * (pos[:, None] == neg[None]).double().sum()
    assert m["auc"] == pytest.approx((pairs / (len(pos) * len(neg))).item())
    bins = torch.clamp((p * 10).long(), max=9)
    ece = sum(abs(p[bins == k].sum() - y[bins == k].sum()).item() for k in range(10)) / 200
    assert m["ece"] == pytest.approx(ece) and m["brier"] == pytest.approx(((p - y) ** 2).mean().item())
    assert m["at"]["0.9"]["coverage"] == pytest.approx((p >= 0.9).double().mean().item())
    assert m["at"]["0.9"]["precision"] == pytest.approx(y[p >= 0.9].mean().item())
    tied = calibration(torch.tensor([0.5, 0.5, 0.2, 0.8], dtype=torch.float64), torch.tensor([1.0, 0, 0, 1]))
    assert tied["auc"] == pytest.approx(0.875)  # positives {0.5, 0.8}, negatives {0.5, 0.2}: (1 + 0.5 + 1 + 1) / 4
    assert calibration(torch.tensor([0.3, 0.6], dtype=torch.float64), torch.ones(2))["auc"] is None


def test_resume_continues_exactly(folder, tmp_path, monkeypatch):
    path = folder[0]
    train_exit_predictors(config(folder, steps=12))
    straight = load_file(path / PREDICTOR_FILE)
    import mexit.training.predictors as tp

    original_step, calls = tp.PredictorTrainer.step, []

    def stop_after_five(self, blocks):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original_step(self, blocks)

    monkeypatch.setattr(tp.PredictorTrainer, "step", stop_after_five)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 5 of 12.*plus --resume \(without --overwrite"):
        train_exit_predictors(config(folder, steps=12, overwrite=True))  # as the message says: resume, no overwrite
    monkeypatch.setattr(tp.PredictorTrainer, "step", original_step)
    train_exit_predictors(config(folder, steps=12, resume=True))
    resumed = load_file(path / PREDICTOR_FILE)
    torch.testing.assert_close(resumed["weight"], straight["weight"])
    torch.testing.assert_close(resumed["bias"], straight["bias"])
    report = json.loads((path / "exit_predictors_report.json").read_text())
    assert report["training"]["resumed_at"] == [5] and "resumed at step 5" in \
        (path / "exit_predictors_report.md").read_text()
    with pytest.raises(ValueError, match=r"trained with --lr 0\.01, this run gives 0\.1: resume with the run's "
                                         r"settings \(the length \(--steps / --epochs\), --device and --save-every"):
        train_exit_predictors(config(folder, steps=12, resume=True, lr=0.1))  # a changed setting is not ignored


def test_bad_input_fails_before_work(folder, tmp_path, capsys):
    path = folder[0]
    plain = tmp_path / "plain"
    make_hf_checkpoint(plain, exits=())
    cases = [
        (dict(model=str(tmp_path / "missing")), FileNotFoundError, "does not exist"),
        (dict(model=str(plain)), ValueError, "has no exit heads"),
        (dict(exits=(4,)), ValueError, r"exits \[4\] are not exits of this checkpoint below the final head"),
        (dict(final_head=2, exits=(3,)), ValueError, r"exits \[3\] are not exits"),
        (dict(final_head=7), ValueError, "final head 7 is not an exit"),
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(resume=True), FileNotFoundError, "holds no exit_predictors_state.pt"),
        (dict(resume=True, overwrite=True), ValueError, "--resume continues the saved run and --overwrite"),
        (dict(eval_max_blocks=0), ValueError, "eval_max_blocks must be >= 1"),
        (dict(save_every=-5), ValueError, "save_every must be >= 0"),
        (dict(steps=None, epochs=float("inf")), ValueError, "epochs finite and > 0"),
        (dict(lr=float("inf")), ValueError, "lr must be > 0 and at most 1000 .* got inf"),
        (dict(lr=1e300), ValueError, "lr must be > 0 and at most 1000"),
    ]
    for kw, err, message in cases:
        with pytest.raises(err, match=message):
            train_exit_predictors(config(folder, **kw))
    write_predictors(path, 64, (1,))
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        train_exit_predictors(config(folder))
    capsys.readouterr()
    assert main(["train-exit-predictors", "--model", str(path), "--data", str(folder[2])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pass --overwrite" in err[0]


def test_a_run_that_diverges_keeps_the_stored_predictors(folder, diverging_updates):
    """An update that leaves inf in the probes stops the run before writing: the folder's predictors are the ones
    it held before."""
    path = folder[0]
    write_predictors(path, 32, (1, 2, 3))
    before = (path / PREDICTOR_FILE).read_bytes()
    with pytest.raises(TrainingDiverged, match="trained predictors hold NaN or inf after step 1"):
        train_exit_predictors(config(folder, steps=1, overwrite=True))
    assert (path / PREDICTOR_FILE).read_bytes() == before


def test_stored_predictors_are_checked_and_travel_with_the_weights(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint[0], src)
    out = tmp_path / "converted"
    (src / "prompts.txt").write_text("ROMEO. But soft,\n  the domain's own prompts \n")  # `mexit ablate`'s default
    assert main(["convert", str(src), str(out), "--dtype", "fp16"]) == 0
    assert mexit.load(out).model.predictors.layers == (1, 2, 3)
    assert (out / "prompts.txt").read_bytes() == (src / "prompts.txt").read_bytes()
    stored = load_file(src / PREDICTOR_FILE)
    for change, message in ((dict(layers=torch.tensor([2, 1, 3])), "must be distinct and ascending"),
                            (dict(weight=stored["weight"][:, :5].contiguous()), "do not fit 3 exits of width"),
                            (dict(layers=torch.tensor([1, 2, 9])), r"exits \[9\], which this checkpoint does not"),
                            (dict(bias=torch.tensor([0.0, float("nan"), 0.0])), "NaN or inf")):
        save_file({**stored, **change}, src / PREDICTOR_FILE)
        with pytest.raises(ValueError, match=message):
            mexit.load(src)
    for name, remedy in ((PREDICTOR_FILE, "mexit train-exit-predictors --overwrite"),
                         ("token_counts.safetensors", "mexit count-tokens --overwrite")):
        shutil.copy(tiny_checkpoint[0] / PREDICTOR_FILE, src / PREDICTOR_FILE)
        (src / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
        with pytest.raises(ValueError, match=f"is not a readable safetensors file .*{remedy}"):
            mexit.load(src)
        (src / name).unlink()


def test_learned_reads_predictors_not_heads(tiny_checkpoint):
    """With a threshold no row reaches, a step reads full depth plus one predictor (d + 1 fp32) per checked exit:
    the exact bytes, and at most 1.02x full depth on this model's proportions."""
    from mexit.decoding.stats import block_bytes

    lm = mexit.load(tiny_checkpoint[0], backend="torch", dtype="fp32")
    c, n = lm.config, 6
    prompts = [[5, 17, 200, 3], [99]]
    for engine in ("eager", "static"):
        lm.engine = engine
        out = lm.generate(prompts, n, eos_token_id=None, early_exit=ExitPolicy(1.0, "learned"))
        assert out.tokens == lm.generate(prompts, n, eos_token_id=None).tokens
        st = out.stats
        assert st["weight_predictors"] == 3 * (n - 1) and st["weight_heads"] == n - 1
        full = 4 * block_bytes(c, torch.float32) + c.vocab_size * c.n_embd * 4
        assert st["weight_bytes_per_token"] == pytest.approx(full + 3 * (c.n_embd + 1) * 4)
        assert st["weight_bytes_ratio"] <= 1.02
        by_prob = lm.generate(prompts, n, eos_token_id=None, early_exit=ExitPolicy(1.0)).stats
        head = c.vocab_size * c.n_embd * 4  # max-prob reads a head at every check: 4 heads a token
        assert by_prob["weight_bytes_ratio"] == pytest.approx((full + 3 * head) / full)


def test_learned_without_predictors_is_refused_before_work(folder, tmp_path, capsys):
    from mexit.bench import ablate, latency

    path = folder[0]
    message = "measure 'learned' needs the checkpoint's exit predictors"
    with pytest.raises(ValueError, match=message):
        mexit.load(path).generate([[1, 2]], 3, early_exit=ExitPolicy(0.5, "learned"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\n")
    with pytest.raises(ValueError, match=message):
        ablate.main(["--model", str(path), "--prompts", str(prompts), "--measures", "learned", "--out",
                     str(tmp_path / "abl"), "--quiet", "--no-plot"])
    with pytest.raises(ValueError, match=message):
        latency.main(["--model", str(path), "--modes", "ee:learned:0.5", "--out", str(tmp_path / "lat")])
    assert not (tmp_path / "abl").exists() and not (tmp_path / "lat").exists()
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--input-ids", "1,2", "--mode", "early-exit", "--measure",
                 "learned", "--threshold", "0.5"]) == 2
    assert capsys.readouterr().err.startswith("error: measure 'learned' needs")


@pytest.mark.parametrize("name", ["small_model", "small_model_12l"])
def test_shipped_models_read_at_most_1_02x_with_an_unreachable_threshold(name):
    from pathlib import Path

    lm = mexit.load(Path(__file__).resolve().parents[1] / "bench" / name, backend="torch", dtype="fp32")
    assert lm.model.predictors.layers == tuple(x for x in lm.config.exit_layers if x < lm.config.n_layer)
    prompts = ["ROMEO. But soft, what light", "KING. Now, my lords,"]
    out = lm.generate(prompts, 16, eos_token_id=None, early_exit=ExitPolicy(1.0, "learned"))
    assert out.tokens == lm.generate(prompts, 16, eos_token_id=None).tokens
    assert out.stats["weight_bytes_ratio"] <= 1.02
    by_prob = lm.generate(prompts, 16, eos_token_id=None, early_exit=ExitPolicy(1.0)).stats
    assert by_prob["weight_bytes_ratio"] > 1.4  # a head at every checked exit
