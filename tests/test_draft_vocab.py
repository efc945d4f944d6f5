"""Frequency-ranked draft vocabularies (FR-Spec): the ranking, `mexit count-tokens`, and speculative decoding with
`draft_vocab` staying exact: greedy output identical to full depth for every target, draft exit, draft length and
vocabulary size on batches of 1, 3 and 7 rows; sampling keeps the target distribution (chi-square); a draft reads
N / V of its head."""

import shutil

import pytest
import torch
from test_speculative import CHI2_001, PROMPTS, TARGETS, agreeing_checkpoint, chi_square, exact_marginals

import mexit
from mexit import SpeculativeConfig
from mexit.frontends.cli import main
from mexit.model.token_counts import TOKEN_COUNTS_FILE, draft_vocabulary, load_token_counts, save_token_counts


def with_counts(folder, vocab, seed=0):
    """Token counts of a Zipf-like text whose ranking is a fixed permutation of the ids."""
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    counts = torch.empty(vocab, dtype=torch.long)
    counts[order] = (1000 / torch.arange(1, vocab + 1)).long()
    save_token_counts(folder, counts, ["zipf"])
    return folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return mexit.load(with_counts(agreeing_checkpoint(tmp_path_factory.mktemp("vocab")), 257), backend="torch")


def test_ranking_takes_the_most_frequent_ids_lower_id_first_on_ties():
    counts = torch.tensor([5, 9, 0, 9, 7, 1])
    assert draft_vocabulary(counts, 3).tolist() == [1, 3, 4]
    assert draft_vocabulary(counts, 4).tolist() == [0, 1, 3, 4]
    assert draft_vocabulary(torch.zeros(4, dtype=torch.long), 2).tolist() == [0, 1]


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_greedy_equals_full_depth_for_every_vocabulary_size(lm, target):
    full = lm.generate(PROMPTS, 12, eos_token_id=None, **target).tokens
    depth = 3 if target.get("exit_layer") == 3 else 4
    rates = {}
    for draft_exit in range(1, depth):
        for k in (1, 3, 5):
            for n in (2, 16, 64, 257):
                out = lm.generate(PROMPTS, 12, eos_token_id=None, speculative=SpeculativeConfig(draft_exit, k, None, n),
                                  **target)
                assert out.tokens == full, (draft_exit, k, n)
                assert out.stats["draft_vocab"] == n
                rates.setdefault(n, []).append(out.stats["acceptance_rate"] or 0.0)
    assert max(rates[257]) > 0.1 and min(rates[257]) < 1.0  # drafts both accepted and rejected
    assert sum(rates[2]) < sum(rates[257])  # two tokens draft worse than all of them


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_rows_alone_and_in_a_batch_on_every_engine(lm, tmp_path, batch):
    spec = SpeculativeConfig(2, 3, None, 32)
    want = lm.generate(PROMPTS[:batch], 12, eos_token_id=None).tokens
    assert lm.generate(PROMPTS[:batch], 12, eos_token_id=None, speculative=spec).tokens == want
    assert [lm.generate([p], 12, eos_token_id=None, speculative=spec).tokens[0] for p in PROMPTS[:batch]] == want
    static = mexit.load(lm.model.folder, backend="torch", engine="static")
    assert static.generate(PROMPTS[:batch], 12, eos_token_id=None, speculative=spec).tokens == want


def test_whole_vocabulary_is_the_full_head_and_bytes_shrink_with_it(lm):
    full = lm.generate(PROMPTS, 12, eos_token_id=None, speculative=SpeculativeConfig(2, 3))
    every = lm.generate(PROMPTS, 12, eos_token_id=None, speculative=SpeculativeConfig(2, 3, None, 257))
    assert every.tokens == full.tokens and every.drafted == full.drafted
    assert every.stats["weight_heads"] == pytest.approx(full.stats["weight_heads"])
    small = lm.generate(PROMPTS, 12, eos_token_id=None, speculative=SpeculativeConfig(2, 1, None, 64))
    # per round: the target's head and at most one draft, which reads 64 / 257 of a head
    drafts = (small.stats["weight_heads"] - small.stats["rounds"]) * 257 / 64
    assert drafts == pytest.approx(round(drafts)) and 0 < round(drafts) <= small.stats["rounds"]


@pytest.mark.parametrize("n", [3, 6])
def test_sampling_keeps_the_target_distribution(tmp_path, n):
    lm = mexit.load(with_counts(agreeing_checkpoint(tmp_path, vocab=8, scale=0.12), 8), backend="torch", device="cpu")
    prompt, rows, steps = [3, 1, 4], 3000, 3
    out = lm.generate([prompt] * rows, steps, do_sample=True, seed=list(range(rows)), eos_token_id=None,
                      speculative=SpeculativeConfig(1, 2, None, n))
    assert 0.1 < out.stats["acceptance_rate"] < 0.95
    allowed = draft_vocabulary(lm.model.token_counts, n).tolist()
    drafted = {t for row, flags in zip(out.tokens, out.drafted) for t, f in zip(row, flags) if f}
    assert drafted <= set(allowed)  # a kept draft is always a draft-vocabulary token
    assert any(t not in allowed for row in out.tokens for t in row)  # the residual reaches the other tokens
    for step, probs in enumerate(exact_marginals(lm, prompt, steps)):
        counts = torch.bincount(torch.tensor([row[step] for row in out.tokens]), minlength=8)
        stat, dof = chi_square(counts, probs, rows)
        assert stat < CHI2_001[dof], (step, stat, dof, counts.tolist(), (probs * rows).tolist())


def test_count_tokens_command_and_bad_input(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint[0], folder)
    text = tmp_path / "text.txt"
    text.write_text("abc abd abe\n" * 20)
    assert main(["count-tokens", "--model", str(folder), "--data", str(text)]) == 0
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text.read_text())["input_ids"] + [256]  # eos ends each file
    counts = load_token_counts(folder, 257)
    assert counts.tolist() == torch.bincount(torch.tensor(ids), minlength=257).tolist()
    out = capsys.readouterr().out
    assert "wrote" in out and "ids this text never used, in no meaningful order: count more text" in out
    assert main(["count-tokens", "--model", str(folder), "--data", str(text)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {folder / TOKEN_COUNTS_FILE} exists")
    again = ["count-tokens", "--model", str(folder), "--data", str(text), f"{tmp_path}/./text.txt",
             "--overwrite"]
    assert main(again) == 2  # one file under two spellings: counted twice, silently, before
    err = capsys.readouterr().err
    assert err.startswith("error: data file") and "is given twice (also as" in err
    from mexit.training.common import check_text

    same = str(text)  # one string object as data and held-out data (a config, not argv)
    with pytest.raises(ValueError, match="is given twice: its text would count twice, or be trained on and held out"):
        check_text(folder, [same], [same])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc \xff\xfe abd\n")
    assert main(["count-tokens", "--model", str(folder), "--data", str(bad), "--overwrite"]) == 0
    assert "bad.txt is not valid UTF-8 (first bad byte at offset 4): bad bytes are read as U+FFFD" in \
        capsys.readouterr().err
    lm = mexit.load(folder)
    with pytest.raises(ValueError, match="draft_vocab must be an integer >= 2"):
        SpeculativeConfig(2, 2, None, 1)
    with pytest.raises(ValueError, match="draft_vocab 258 exceeds the vocabulary"):
        lm.generate([[1, 2]], 3, speculative=SpeculativeConfig(2, 2, None, 258))
    (folder / TOKEN_COUNTS_FILE).unlink()
    with pytest.raises(ValueError, match="draft_vocab needs the checkpoint's token frequencies"):
        mexit.load(folder).generate([[1, 2]], 3, speculative=SpeculativeConfig(2, 2, None, 8))


@pytest.mark.parametrize("name", ["small_model", "small_model_12l"])
def test_shipped_models_greedy_equals_full_depth(name):
    """The shipped real models carry token counts: restricted drafts keep every target's greedy output."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bench" / name
    lm = mexit.load(folder, backend="torch", dtype="fp32")
    assert lm.model.token_counts is not None and lm.model.predictors is not None
    prompts = ["ROMEO. But soft, what light", "KING. Now, my lords,", "HAMLET. I have"]
    n = lm.config.n_layer
    rates = []
    for target in (dict(), dict(exit_layer=n - 2), dict(contrast=(n, n // 2))):
        full = lm.generate(prompts, 24, eos_token_id=None, **target).tokens
        depth = n - 2 if "exit_layer" in target else n
        for draft_exit in (x for x in lm.config.exit_layers if x < depth):
            for k, size in ((1, 256), (3, 1024)):
                spec = SpeculativeConfig(draft_exit, k, None, size)
                out = lm.generate(prompts, 24, eos_token_id=None, speculative=spec, **target)
                assert out.tokens == full, (target, spec)
                rates.append(out.stats["acceptance_rate"])
    assert max(rates) > 0.3 and min(rates) < 1.0  # drafts accepted and rejected


def test_draft_heads_comparison(lm, tmp_path):
    """bench/draft_heads.py: a full-rank factor and the whole vocabulary agree with the full head exactly; shares
    are the weights read over a head's."""
    from mexit.bench import draft_heads

    blocks = torch.tensor([PROMPTS[3] * 3, PROMPTS[0] * 4 + [7, 7]])
    d, v = lm.config.n_embd, lm.config.vocab_size
    rows = draft_heads.compare(lm.model, blocks, [2], [v, 16], [d, 4])
    by = {r["head"]: r for r in rows}
    assert by[f"vocab {v}"]["agreement"] == by["full"]["agreement"] == by[f"rank {d}"]["agreement"]
    assert by["vocab 16"]["head_share"] == pytest.approx(16 / v)
    assert by["rank 4"]["head_share"] == pytest.approx(4 * (v + d) / (v * d))
    assert draft_heads.main(["--model", str(tmp_path / "missing"), "--text", "x"]) == 2
