"""repetition_penalty and no_repeat_ngram_size with transformers' semantics: the original head against transformers'
generate (batched, left-padded, every engine), DoLa against transformers 4.51.3, ACD by its definition; early exit by
its definition (each token its exit head's controlled argmax, on exit states recomputed naively) and its limits
(transformers, the fixed exit); speculative decoding identical to its target, greedy, and keeping the controlled
target distribution, sampling (chi-square)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hf_reference import naive_exit_states
from test_speculative import CHI2_001, DEVICE, STATIC, agreeing_checkpoint, chi_square
from test_speculative import PROMPTS as SPEC_PROMPTS

import mexit
from mexit import SpeculativeConfig
from mexit.decoding.early_exit import ExitPolicy
from mexit.frontends.compat import AutoMultiExitModel
from mexit.kernels.control_repetition_ref import penalize_repetition

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
    want = transformers_tokens(hf, [PROMPTS[1]], 1.3)
    for speculative in (None, SpeculativeConfig(2, 3)):
        ours = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                              speculative=speculative)
        assert ours[:, ids.shape[1]:].tolist() == want, speculative


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
@pytest.mark.parametrize("mode", [dict(contrast=(4, 2)), dict(dola_layers="high")])
def test_acd_and_dola_take_the_argmax_of_their_penalized_kept_scores(tiny_checkpoint, engine, mode):
    """keep_logits keeps the mode's scores before the repetition controls (ACD's log q, DoLa's contrast), and the
    token is the argmax of those scores penalized."""
    lm = mexit.load(tiny_checkpoint[0], dtype="fp32", backend="torch", engine=engine)
    out = lm.generate(PROMPTS, 8, **mode, repetition_penalty=1.5, eos_token_id=None, keep_logits=True)
    for b, (prompt, tokens) in enumerate(zip(PROMPTS, out.tokens)):
        for t, token in enumerate(tokens):
            seen = torch.zeros(1, lm.config.vocab_size, dtype=torch.bool)
            seen[0, prompt + tokens[:t]] = True
            assert int(penalize_repetition(out.logits[t][b:b + 1], seen, 1.5).argmax()) == token


def test_bad_values_and_the_cli(tiny_checkpoint, capsys):
    from mexit.decoding.early_exit import ExitPolicy
    from mexit.frontends.cli import main

    lm = mexit.load(tiny_checkpoint[0], backend="torch")
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        lm.generate([[1, 2]], 3, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 0"):
        lm.generate([[1, 2]], 3, no_repeat_ngram_size=-1)
    model = str(tiny_checkpoint[0])
    assert main(["generate", "--model", model, "--input-ids", "1,2,3", "--max-new-tokens", "5",
                 "--repetition-penalty", "1.2", "--no-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == lm.generate([[1, 2, 3]], 5, repetition_penalty=1.2,
                                                                        eos_token_id=None).tokens
    assert main(["generate", "--model", model, "--input-ids", "1,2,3", "--max-new-tokens", "6", "--mode",
                 "early-exit", "--threshold", "0.3", "--repetition-penalty", "1.5", "--no-repeat-ngram-size", "2",
                 "--no-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == lm.generate(
        [[1, 2, 3]], 6, early_exit=ExitPolicy(0.3), repetition_penalty=1.5, no_repeat_ngram_size=2,
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
    with pytest.raises(NotImplementedError, match="output_scores / output_logits with DoLa, the repetition"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, repetition_penalty=1.2,
                       return_dict_in_generate=True, output_scores=True)
    for generate in (lambda: lm.generate([[1, 2]], 2, dola_layers=5),
                     lambda: model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, dola_layers=5)):
        with pytest.raises(ValueError, match="dola_layers must be 'low', 'high' or a list"):
            generate()


# ---- early exit and speculative decoding: the controls on the scores each token is chosen from ----

CONTROLS = [(1.5, 0), (1.0, 2), (1.3, 3)]  # (repetition_penalty, no_repeat_ngram_size)
# the generation paths on the interpreted kernels (no GPU) take both controls at once (each alone: the torch cases
# here, and the kernel's own tests, tests/test_control_repetition.py); compiled on a GPU, every setting
INTERPRETED_CONTROLS = CONTROLS[2:] if not torch.cuda.is_available() else CONTROLS


def transformers_controls(penalty, n):
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    chain = LogitsProcessorList()
    if penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(penalty))
    if n:
        chain.append(NoRepeatNGramLogitsProcessor(n))
    return chain


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("measure,threshold", [("max-prob", 0.3), ("margin", 0.2), ("cosine", 0.8)])
def test_early_exit_takes_its_exit_heads_controlled_argmax(tiny_checkpoint, engine, measure, threshold):
    """The definition: a token leaving at exit L is the argmax of L's logits after transformers' processors on the
    row's sequence so far, computed on its exit state (recomputed naively, with state propagation); a max-prob
    confidence is the top probability of those controlled logits."""
    folder, hf, _ = tiny_checkpoint
    lm = mexit.load(folder, dtype="fp32", backend="torch", engine=engine, device="cpu")
    prompts = [[5, 17, 5, 17, 200], [42, 7, 128, 255, 1, 64, 12], [9]]
    exited = set()
    for penalty, n in CONTROLS:
        out = lm.generate(prompts, 12, early_exit=ExitPolicy(threshold, measure), repetition_penalty=penalty,
                          no_repeat_ngram_size=n, eos_token_id=None)
        chain = transformers_controls(penalty, n)
        for b, prompt in enumerate(prompts):
            tokens, layers = out.tokens[b], out.exit_layers[b]
            exited |= set(layers)
            fed = prompt + tokens[:-1]
            _, _, states = naive_exit_states(hf, fed, [4] * len(prompt) + layers[1:], depth=4)
            for t, (token, layer) in enumerate(zip(tokens, layers)):
                h = states[(len(prompt) - 1 + t, layer)]
                logits = lm.model.head_logits(h[None], "original" if layer == 4 else layer)
                controlled = chain(torch.tensor([prompt + tokens[:t]]), logits)
                assert int(controlled.argmax()) == token, (penalty, n, b, t, layer)
                if measure == "max-prob":
                    assert out.confidences[b][t] == pytest.approx(controlled.softmax(-1).max().item(), abs=1e-5), (
                        penalty, n, b, t, layer)
        assert out.tokens == [lm.generate([p], 12, early_exit=ExitPolicy(threshold, measure), eos_token_id=None,
                                          repetition_penalty=penalty, no_repeat_ngram_size=n).tokens[0]
                              for p in prompts]  # rows alone
    assert 4 in exited and exited & {1, 2, 3}  # exits both early and at full depth


@pytest.mark.parametrize("engine,backend", [("eager", "torch"), ("static", "torch"), ("eager", "triton")])
def test_early_exit_limits_are_transformers_and_the_fixed_exit(tiny_checkpoint, engine, backend):
    folder, hf, _ = tiny_checkpoint
    lm = mexit.load(folder, dtype="fp32", backend=backend, engine=engine)
    prompts = [[5, 17, 5, 17, 200], [42, 7, 128, 255, 1, 64, 12], [9]]
    for penalty, n in INTERPRETED_CONTROLS if backend == "triton" else CONTROLS:
        kw = dict(repetition_penalty=penalty, no_repeat_ngram_size=n, eos_token_id=None)
        never = lm.generate(prompts, 16, early_exit=ExitPolicy(1.0), **kw).tokens
        assert never == [transformers_ngram_tokens(hf, p, n, penalty) for p in prompts], (penalty, n)
        for propagation in ("eager", "deferred"):
            always = lm.generate(prompts, 16, early_exit=ExitPolicy(0.0, exits=(2,), propagation=propagation), **kw)
            assert always.tokens == lm.generate(prompts, 16, exit_layer=2, **kw).tokens


@pytest.mark.parametrize("engine", STATIC)
@pytest.mark.parametrize("schedule", ["segments", "predicated"])
def test_early_exit_static_triton_schedules_equal_eager(tiny_checkpoint, schedule, engine):
    """The triton kernels take the controlled confidences and tokens (strided views of a top-2) on both schedules
    (and CUDA graphs replay them, where there is a GPU)."""
    folder = tiny_checkpoint[0]
    eager = mexit.load(folder, dtype="fp32", backend="torch", device=DEVICE)
    static = mexit.load(folder, dtype="fp32", backend="triton", engine=engine, device=DEVICE)
    prompts = [[5, 17, 5, 17, 200], [42, 7, 128, 255, 1, 64, 12], [9]]
    kw = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, eos_token_id=None)
    for policy in (ExitPolicy(0.3, schedule=schedule), ExitPolicy(0.8, "cosine", schedule=schedule)):
        want = eager.generate(prompts, 8, early_exit=dataclasses.replace(policy, schedule="segments"), **kw)
        got = static.generate(prompts, 8, early_exit=policy, **kw)
        assert got.tokens == want.tokens and got.exit_layers == want.exit_layers, policy
        assert {x for row in got.exit_layers for x in row} & {1, 2, 3}


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory):
    return agreeing_checkpoint(tmp_path_factory.mktemp("agreeing"))


@pytest.mark.parametrize("target", [dict(), dict(exit_layer=3), dict(contrast=(4, 2)), dict(contrast=("original", 1))],
                         ids=str)
def test_speculative_greedy_equals_its_target(agreeing, target):
    lm = mexit.load(agreeing, dtype="fp32", backend="torch")
    depth = 3 if target.get("exit_layer") == 3 else 4
    rates = []
    for penalty, n in CONTROLS:
        kw = dict(repetition_penalty=penalty, no_repeat_ngram_size=n, eos_token_id=None, **target)
        full = lm.generate(SPEC_PROMPTS, 12, **kw).tokens
        assert full != lm.generate(SPEC_PROMPTS, 12, eos_token_id=None, **target).tokens  # the controls act
        for draft_exit in range(1, depth):
            for k, threshold in ((1, None), (3, None), (5, 0.3)):
                out = lm.generate(SPEC_PROMPTS, 12, speculative=SpeculativeConfig(draft_exit, k, threshold), **kw)
                assert out.tokens == full, (penalty, n, draft_exit, k, threshold)
                rates.append(out.stats["acceptance_rate"])
    assert max(rates) > 0.3 and min(rates) < 1.0  # drafts both accepted and rejected


@pytest.mark.parametrize("engine", STATIC)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_speculative_static_engine_and_triton(agreeing, backend, engine):
    eager = mexit.load(agreeing, dtype="fp32", backend="torch", device=DEVICE)
    static = mexit.load(agreeing, dtype="fp32", backend=backend, engine=engine, device=DEVICE)
    for penalty, n in INTERPRETED_CONTROLS if backend == "triton" else CONTROLS:
        kw = dict(repetition_penalty=penalty, no_repeat_ngram_size=n, eos_token_id=None)
        full = eager.generate(SPEC_PROMPTS, 10, **kw).tokens
        for spec in (SpeculativeConfig(2, 3), SpeculativeConfig(1, 4, 0.3)):
            assert static.generate(SPEC_PROMPTS, 10, speculative=spec, **kw).tokens == full, (penalty, n, spec)


def controlled_marginals(lm, prompt, steps, penalty, n):
    """Exact distribution of each of the first `steps` sampled tokens under transformers' processors, by
    enumeration."""
    from mexit.frontends.compat import FastMultiExitModel

    chain = transformers_controls(penalty, n)
    v = lm.config.vocab_size
    prefixes, weights, marginals = [[]], torch.ones(1, dtype=torch.float64), []
    for _ in range(steps):
        ids = torch.tensor([prompt + p for p in prefixes])
        logits = FastMultiExitModel(lm, mexit.DecodeConfig())(ids).logits[:, -1].double()
        joint = weights[:, None] * chain(ids, logits).softmax(-1)
        marginals.append(joint.sum(0))
        prefixes = [p + [t] for p in prefixes for t in range(v)]
        weights = joint.reshape(-1)
    return marginals


@pytest.mark.parametrize("penalty,n", [(3.0, 0), (0.3, 0), (1.0, 2)])
def test_speculative_sampling_keeps_the_controlled_target_distribution(tmp_path, penalty, n):
    lm = mexit.load(agreeing_checkpoint(tmp_path, vocab=8, scale=0.12), dtype="fp32", backend="torch", device="cpu")
    prompt, rows, steps = [3, 1, 3], 3000, 3
    out = lm.generate([prompt] * rows, steps, do_sample=True, seed=list(range(rows)), eos_token_id=None,
                      speculative=SpeculativeConfig(1, 2), repetition_penalty=penalty, no_repeat_ngram_size=n)
    assert 0.2 < out.stats["acceptance_rate"] < 0.95
    marginals = controlled_marginals(lm, prompt, steps, penalty, n)
    plain = controlled_marginals(lm, prompt, 1, 1.0, 0)[0]
    assert (marginals[0] - plain).abs().max() > 0.02  # the controls move the target distribution
    for step, probs in enumerate(marginals):
        counts = torch.bincount(torch.tensor([row[step] for row in out.tokens]), minlength=8)
        possible = probs > 0
        assert counts[~possible].sum() == 0  # a banned token is never drawn
        stat, dof = chi_square(counts[possible], probs[possible], rows)
        assert stat < CHI2_001[dof], (step, stat, dof, counts.tolist(), (probs * rows).tolist())
    if n:  # (1, 3) is in the prompt: 3 never follows 1, and no bigram repeats
        assert all(tuple(seq[i:i + 2]) not in {tuple(seq[j:j + 2]) for j in range(i)}
                   for seq in (prompt + row for row in out.tokens) for i in range(2, len(seq) - 1))
