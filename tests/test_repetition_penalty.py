"""repetition_penalty with transformers' semantics: the original head against transformers' generate (batched,
left-padded, every engine), DoLa against transformers 4.51.3, ACD by its definition, and the modes that refuse it."""

import json
from pathlib import Path

import pytest
import torch

import mexit
from mexit.decoding.sampling import penalize_repetition
from mexit.frontends.compat import AutoMultiExitModel

PROMPTS = [[5, 17, 200, 3], [42, 7, 128, 255, 1, 64, 12], [9]]


def transformers_tokens(hf, prompts, penalty, new=12):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, repetition_penalty=penalty,
                      pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("engine,backend", [("eager", "torch"), ("static", "torch"), ("eager", "triton")])
def test_original_head_equals_transformers(tiny_checkpoint, engine, backend):
    """Each row against transformers alone (its left padding would count as seen tokens there, not in mexit), and
    the batch (left-padded inside mexit) equal to the rows alone."""
    folder, hf, _ = tiny_checkpoint
    lm = mexit.load(folder, dtype="fp32", engine=engine, backend=backend)
    for penalty in (1.2, 0.8, 3.0):
        expected = [transformers_tokens(hf, [prompt], penalty)[0] for prompt in PROMPTS]
        assert lm.generate(PROMPTS, 12, repetition_penalty=penalty, eos_token_id=None).tokens == expected, penalty
    assert expected != [transformers_tokens(hf, [prompt], 1.0)[0] for prompt in PROMPTS]  # it changes tokens here


def test_drop_in_equals_transformers(tiny_checkpoint):
    folder, hf, _ = tiny_checkpoint
    model = AutoMultiExitModel.from_pretrained(folder, dtype="fp32")
    ids = torch.tensor([PROMPTS[1]])
    ours = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.3, eos_token_id=None)
    assert ours[:, ids.shape[1]:].tolist() == transformers_tokens(hf, [PROMPTS[1]], 1.3)


def test_dola_with_penalty_equals_transformers_4_51(tmp_path):
    from dola_reference import SHAPES, write_checkpoint

    recorded = json.loads((Path(__file__).parent / "data" / "dola_transformers_4.51.3.json").read_text())
    for name, (n_layer, tied) in SHAPES.items():
        assert write_checkpoint(tmp_path / name, n_layer, tied) == recorded["checkpoints"][name]["digest"]
        lm = mexit.load(tmp_path / name, dtype="fp32", backend="torch")
        for run in (r for r in recorded["checkpoints"][name]["runs"] if r["repetition_penalty"] == 1.2):
            out = lm.generate([run["prompt"]], recorded["new_tokens"], dola_layers=run["dola_layers"],
                              repetition_penalty=1.2, eos_token_id=None)
            assert out.tokens[0] == run["tokens"], (name, run["dola_layers"], run["prompt"])


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_acd_takes_the_argmax_of_penalized_log_q(tiny_checkpoint, engine):
    lm = mexit.load(tiny_checkpoint[0], dtype="fp32", backend="torch", engine=engine)
    out = lm.generate(PROMPTS, 8, contrast=(4, 2), repetition_penalty=1.5, eos_token_id=None, keep_logits=True)
    for b, (prompt, tokens) in enumerate(zip(PROMPTS, out.tokens)):
        for t, token in enumerate(tokens):
            seen = torch.zeros(1, lm.config.vocab_size, dtype=torch.bool)
            seen[0, prompt + tokens[:t]] = True
            assert int(penalize_repetition(out.logits[t][b:b + 1], seen, 1.5).argmax()) == token


def test_modes_without_it_refuse_by_name(tiny_checkpoint, capsys):
    from mexit.decoding.early_exit import ExitPolicy
    from mexit.decoding.speculative import SpeculativeConfig
    from mexit.frontends.cli import main

    lm = mexit.load(tiny_checkpoint[0], backend="torch")
    for kw in (dict(early_exit=ExitPolicy(threshold=0.5)), dict(speculative=SpeculativeConfig(2, 2))):
        with pytest.raises(NotImplementedError, match="no_repeat_ngram_size with early exit or speculative"):
            lm.generate([[1, 2]], 3, repetition_penalty=1.2, **kw)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        lm.generate([[1, 2]], 3, repetition_penalty=0.0)
    assert main(["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "1,2,3", "--max-new-tokens", "5",
                 "--repetition-penalty", "1.2", "--no-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == lm.generate([[1, 2, 3]], 5, repetition_penalty=1.2,
                                                                        eos_token_id=None).tokens


def transformers_ngram_tokens(hf, prompt, n, penalty=1.0, new=16):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, no_repeat_ngram_size=n,
                      repetition_penalty=penalty, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("engine,backend", [("eager", "torch"), ("static", "torch"), ("eager", "triton")])
def test_no_repeat_ngram_size_equals_transformers(tiny_checkpoint, engine, backend):
    folder, hf, _ = tiny_checkpoint
    lm = mexit.load(folder, dtype="fp32", engine=engine, backend=backend)
    prompts = [[5, 17, 5, 17, 200], [42, 7, 128, 255, 1, 64, 12], [9]]
    for n, penalty in ((1, 1.0), (2, 1.0), (3, 1.0), (2, 1.3)):
        expected = [transformers_ngram_tokens(hf, p, n, penalty) for p in prompts]
        got = lm.generate(prompts, 16, no_repeat_ngram_size=n, repetition_penalty=penalty, eos_token_id=None).tokens
        assert got == expected, (n, penalty)
        for row in got:  # no n-gram twice in the output itself
            grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
            assert len(grams) == len(set(grams))
    assert [transformers_ngram_tokens(hf, p, 2) for p in prompts] != [transformers_ngram_tokens(hf, p, 0)
                                                                     for p in prompts]


def test_dola_and_acd_take_ngram_bans(tiny_checkpoint):
    lm = mexit.load(tiny_checkpoint[0], dtype="fp32", backend="torch")
    for kw in (dict(dola_layers=[2]), dict(contrast=(4, 2))):
        tokens = lm.generate([[3, 3, 3]], 20, no_repeat_ngram_size=2, eos_token_id=None, **kw).tokens[0]
        seq = [3, 3, 3] + tokens
        grams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
        assert all(grams.count(g) == 1 for g in grams[2:]), kw  # the prompt's own repeat (3, 3) aside


def test_edges_of_the_controls(tiny_checkpoint):
    folder, hf, _ = tiny_checkpoint
    lm = mexit.load(folder, dtype="fp32", backend="torch")
    # an n-gram longer than any sequence the batch holds bans nothing (transformers: the same)
    assert lm.generate([[1, 2]], 3, no_repeat_ngram_size=50, eos_token_id=None).tokens == lm.generate(
        [[1, 2]], 3, eos_token_id=None).tokens
    model = AutoMultiExitModel.from_pretrained(folder, dtype="fp32")
    with pytest.raises(NotImplementedError, match="output_scores / output_logits with DoLa or the repetition"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, repetition_penalty=1.2,
                       return_dict_in_generate=True, output_scores=True)
    for generate in (lambda: lm.generate([[1, 2]], 2, dola_layers=5),
                     lambda: model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, dola_layers=5)):
        with pytest.raises(ValueError, match="dola_layers must be 'low', 'high' or a list"):
            generate()
