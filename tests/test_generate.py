"""generate: token-identical to a transformers step-by-step reference in every mode; batches; sampling; eos."""

import pytest
import torch
from hf_reference import hf_greedy

import mexit

MODES = [
    dict(mode="original"),
    dict(mode="exit", exit_layer=2),
    dict(mode="exit", exit_layer=4),
    dict(mode="contrast", contrast=(4, 2)),
    dict(mode="contrast", contrast=("original", 1)),
    dict(mode="contrast", contrast=(3, 1), alpha=0.3, k=3),
]
PROMPTS = [[5, 17, 200, 3], [99], [42, 7, 128, 255, 1, 64, 12]]


def mexit_kwargs(case):
    kw = {k: v for k, v in case.items() if k != "k"}
    if "k" in case:
        kw["min_candidates"] = case["k"]
    return kw


@pytest.mark.parametrize("case", MODES, ids=lambda c: "-".join(map(str, c.values())))
def test_greedy_matches_transformers_step_by_step(tiny_checkpoint, case):
    folder, hf, heads = tiny_checkpoint
    lm = mexit.load(folder, backend="torch")
    out = lm.generate(PROMPTS, max_new_tokens=10, eos_token_id=None, **mexit_kwargs(case))
    assert out.backend == "torch"
    for prompt, tokens in zip(PROMPTS, out.tokens):
        ref = hf_greedy(hf, heads, prompt, 10, case["mode"], case.get("exit_layer"), case.get("contrast"),
                        case.get("alpha", 0.1), case.get("k", 1))
        assert tokens == ref


@pytest.mark.parametrize("case", MODES[:4], ids=lambda c: "-".join(map(str, c.values())))
def test_batch_equals_single_rows(tiny_checkpoint, case):
    lm = mexit.load(tiny_checkpoint[0])
    batch = lm.generate(PROMPTS, max_new_tokens=12, eos_token_id=None, **mexit_kwargs(case)).tokens
    singles = [lm.generate([p], max_new_tokens=12, eos_token_id=None, **mexit_kwargs(case)).tokens[0]
               for p in PROMPTS]
    assert batch == singles


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_rows_fp32_logits_in_a_batch_are_its_own_to_1e_5(tiny_checkpoint, engine):
    """What the README says of batches: a row's fp32 logits in a batch agree with its logits alone to about 1e-5
    (another matmul kernel, a longer masked cache: not bit for bit), so only near-ties and near-boundary draws can
    differ."""
    lm = mexit.load(tiny_checkpoint[0], dtype="fp32", engine=engine)
    together = lm.generate(PROMPTS, 8, eos_token_id=None, keep_logits=True)
    for row, prompt in enumerate(PROMPTS):
        alone = lm.generate([prompt], 8, eos_token_id=None, keep_logits=True)
        assert alone.tokens[0] == together.tokens[row]
        a = torch.stack([step[0] for step in alone.logits])
        b = torch.stack([step[row] for step in together.logits])
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_autocontrastive_gen_names(tiny_checkpoint):
    lm = mexit.load(tiny_checkpoint[0])
    ours = lm.generate(PROMPTS, max_new_tokens=6, contrast=("original", 2)).tokens
    theirs = lm.generate(PROMPTS, max_new_tokens=6, use_original_head=False,
                         contrast_layer_indices=("original", 2)).tokens
    config = mexit.MultiExitConfiguration(use_original_head=False, contrast_layer_indices=("original", 2))
    assert lm.generate(PROMPTS, max_new_tokens=6, multi_exit_config=config).tokens == ours == theirs
    exit3 = lm.generate(PROMPTS, max_new_tokens=6, exit_layer=3).tokens
    assert lm.generate(PROMPTS, max_new_tokens=6, output_layer_index=3).tokens == exit3
    original = lm.generate(PROMPTS, max_new_tokens=6).tokens
    assert lm.generate(PROMPTS, max_new_tokens=6, multi_exit_config=mexit.MultiExitConfiguration()).tokens == original


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5), dict(top_p=0.8, temperature=0.7), dict(contrast=(4, 1))])
def test_seeded_sampling_repeats(tiny_checkpoint, kw):
    lm = mexit.load(tiny_checkpoint[0])
    runs = [lm.generate(PROMPTS, max_new_tokens=16, do_sample=True, seed=7, eos_token_id=None, **kw).tokens
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = lm.generate(PROMPTS, max_new_tokens=16, do_sample=True, seed=8, eos_token_id=None, **kw).tokens
    assert other != runs[0]
    greedy = lm.generate(PROMPTS, max_new_tokens=16, eos_token_id=None,
                         **{k: v for k, v in kw.items() if k == "contrast"}).tokens
    assert runs[0] != greedy


def test_stops_at_eos(tiny_checkpoint):
    lm = mexit.load(tiny_checkpoint[0])
    free = lm.generate(PROMPTS, max_new_tokens=10, eos_token_id=None).tokens
    eos = free[0][3]  # pretend the 4th token of row 0 is eos
    stopped = lm.generate(PROMPTS, max_new_tokens=10, eos_token_id=eos).tokens
    assert stopped[0] == free[0][:4]
    for full, cut in zip(free, stopped):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expected


def test_text_in_text_out(tiny_checkpoint):
    lm = mexit.load(tiny_checkpoint[0])
    out = lm.generate(["Hello", "a longer prompt"], max_new_tokens=5, eos_token_id=None)
    assert len(out.text) == 2 and all(len(t) == 5 for t in out.tokens)
    ids = [lm.tokenizer.encode(p) for p in ["Hello", "a longer prompt"]]
    assert lm.generate(ids, max_new_tokens=5, eos_token_id=None).tokens == out.tokens
    assert out.text[0] == lm.tokenizer.decode(out.tokens[0])


def sample_from_scores(scores, uniform, temperature=1.0, top_k=0, top_p=1.0):
    from mexit.decoding.sampling import SamplingConfig, choose

    return choose(None, scores, SamplingConfig(True, temperature, top_k, top_p), uniform)


def test_sampler_inverse_cdf():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().expand(1000, 4)
    uniform = (torch.arange(1000) + 0.5) / 1000
    counts = torch.bincount(sample_from_scores(scores, uniform), minlength=4) / 1000
    torch.testing.assert_close(counts, probs, atol=2e-3, rtol=0)
    assert set(sample_from_scores(scores, uniform, top_k=2).tolist()) == {0, 1}
    assert set(sample_from_scores(scores, uniform, top_p=0.5).tolist()) == {0}
    assert set(sample_from_scores(scores, uniform, top_p=0.81).tolist()) == {0, 1, 2}
    cold = sample_from_scores(scores, uniform, temperature=0.05)
    assert (cold == 0).float().mean() > 0.99


def test_sampler_ties_keep_index_order():
    scores = torch.zeros(4, 6)  # six equally likely tokens: inverse CDF walks them in index order
    uniform = torch.tensor([0.01, 0.2, 0.55, 0.99])
    assert sample_from_scores(scores, uniform).tolist() == [0, 1, 3, 5]
    assert sample_from_scores(scores, uniform, top_k=2).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("kw", [dict(), dict(contrast=(4, 1)), dict(speculative=mexit.SpeculativeConfig(2, 3)),
                                dict(early_exit=mexit.ExitPolicy(0.5, measure="max-prob")), dict(dola_layers="low")],
                         ids=["original", "acd", "speculative", "early-exit", "dola"])
def test_a_stop_rule_ends_each_row_at_its_token_in_every_mode(tiny_checkpoint, engine, kw):
    """A stop rule (here: a row ends at its 3rd token whose id is even) cuts each row exactly where the rule fires,
    the other rows unchanged; generation ends once every row has ended; stop_strings end a row at the token that
    completes the text (kept)."""
    lm = mexit.load(tiny_checkpoint[0], engine=engine)
    prompts = [[5, 17, 200], [42, 7], [9, 9, 31, 64]]
    free = lm.generate(prompts, 16, eos_token_id=None, **kw).tokens
    calls = []

    def third_even(tokens):
        calls.append(len(tokens[0]))
        return [sum(t % 2 == 0 for t in row) >= 3 for row in tokens]

    def cut(row):
        even = [i for i, t in enumerate(row) if t % 2 == 0]
        return row[: even[2] + 1] if len(even) >= 3 else row

    stopped = lm.generate(prompts, 16, eos_token_id=None, stop=third_even, **kw).tokens
    assert stopped == [cut(row) for row in free]
    assert calls == list(range(1, len(calls) + 1))  # once per position, in order
    text = lm.tokenizer.decode(free[1][2:4])
    by_text = lm.generate(prompts, 16, eos_token_id=None, stop_strings=[text], **kw)
    assert len(by_text.tokens[1]) <= 4 and text in lm.tokenizer.decode(by_text.tokens[1])
    assert all(free[b][: len(row)] == row for b, row in enumerate(by_text.tokens))
    with pytest.raises(ValueError, match="stop_strings must be a non-empty string"):
        lm.generate(prompts, 4, stop_strings=[""])
