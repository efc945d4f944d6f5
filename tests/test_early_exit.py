"""The confidence-gated scheduler: limits equal the fixed modes, the cache equals a naive recomputation with
the same exit layers, eager == deferred, batch == single rows, measures and the decaying schedule."""

import json
import math

import pytest
import torch
from hf_reference import naive_exit_states

import mexit
from mexit.decoding.early_exit import ExitPolicy
from mexit.frontends.cli import main as cli_main

PROMPTS = [[5, 17, 200, 3], [99], [42, 7, 128, 255, 1, 64, 12]]
N_NEW = 10
POLICIES = [ExitPolicy(0.3), ExitPolicy(0.2, "margin"), ExitPolicy(0.8, "cosine"),
            ExitPolicy(0.25, exits=(1, 3), min_layer=1), ExitPolicy(0.4, decay_tau=4.0), ExitPolicy(0.6, "learned")]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return mexit.load(tiny_checkpoint[0], backend="torch", device="cpu")  # beside transformers on the CPU


def run(lm, policy, prompts=PROMPTS, **kw):
    return lm.generate(prompts, N_NEW, eos_token_id=None, early_exit=policy, **kw)


@pytest.mark.parametrize("measure", ["max-prob", "margin", "cosine", "learned"])
def test_unreachable_threshold_is_full_depth(lm, measure):
    out = run(lm, ExitPolicy(1.0, measure))
    assert out.tokens == lm.generate(PROMPTS, N_NEW, eos_token_id=None).tokens
    assert all(layer == 4 for row in out.exit_layers for layer in row)
    if measure == "learned":  # the predictors learned agreement with the original head, not exit 3's
        with pytest.raises(ValueError, match="the predictors learned agreement with the 'original' head"):
            run(lm, ExitPolicy(1.0, measure, final_head=3))
        return
    top3 = run(lm, ExitPolicy(1.0, measure, final_head=3))
    assert top3.tokens == lm.generate(PROMPTS, N_NEW, eos_token_id=None, exit_layer=3).tokens


@pytest.mark.parametrize("layer", [1, 2, 3])
@pytest.mark.parametrize("measure,threshold", [("max-prob", 0.0), ("margin", 0.0), ("cosine", -1.0),
                                               ("learned", 0.0)])
def test_always_exiting_at_one_layer_is_the_fixed_exit(lm, layer, measure, threshold):
    out = run(lm, ExitPolicy(threshold, measure, exits=(layer,)))
    assert out.tokens == lm.generate(PROMPTS, N_NEW, eos_token_id=None, exit_layer=layer).tokens
    assert all(x == layer for row in out.exit_layers for x in row)
    assert out.stats["mean_exit_layer"] == layer


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.measure}-{p.threshold}-{p.exits}-{p.decay_tau}")
@pytest.mark.parametrize("propagation", ["eager", "deferred"])
def test_cache_equals_naive_recomputation(tiny_checkpoint, lm, policy, propagation):
    hf = tiny_checkpoint[1]
    policy = ExitPolicy(**{**policy.__dict__, "propagation": propagation})
    out = run(lm, policy, return_cache=True)
    layers = [x for row in out.exit_layers for x in row]
    assert 1 in layers or 2 in layers or 3 in layers, "policy should exit early somewhere"
    assert 4 in layers, "and run full depth somewhere"
    longest = max(map(len, PROMPTS))
    for b, prompt in enumerate(PROMPTS):
        fed = prompt + out.tokens[b][:-1]  # the last token is never fed back
        exits = [4] * len(prompt) + out.exit_layers[b][1:]  # token i+1's states are written at its step
        K, V, states = naive_exit_states(hf, fed, exits, depth=4)
        offset = longest - len(prompt)
        ours_k = out.cache.k[:, b, :, offset: offset + len(fed)].transpose(1, 2)
        ours_v = out.cache.v[:, b, :, offset: offset + len(fed)].transpose(1, 2)
        torch.testing.assert_close(ours_k, K, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours_v, V, atol=1e-4, rtol=1e-4)
        if policy.measure == "max-prob":  # recorded confidences are the exit heads' max probability
            for i, layer in enumerate(out.exit_layers[b][1:]):
                h = states[(len(prompt) + i, layer)]
                head = "original" if layer == 4 else layer
                probs = lm.model.head_logits(h, head).softmax(-1)
                assert out.confidences[b][i + 1] == pytest.approx(probs.max().item(), abs=1e-5)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.measure}-{p.threshold}-{p.exits}-{p.decay_tau}")
def test_eager_equals_deferred(lm, policy):
    eager = run(lm, policy, return_cache=True)
    deferred = run(lm, ExitPolicy(**{**policy.__dict__, "propagation": "deferred"}), return_cache=True)
    assert eager.tokens == deferred.tokens and eager.exit_layers == deferred.exit_layers
    torch.testing.assert_close(eager.cache.k, deferred.cache.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager.cache.v, deferred.cache.v, atol=1e-5, rtol=1e-5)
    assert eager.stats["kv_filled"] == deferred.stats["kv_filled"] + deferred.stats["kv_owed"] == sum(
        4 - x for row in eager.exit_layers for x in row[1:])


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.measure}-{p.threshold}-{p.exits}-{p.decay_tau}")
def test_batch_equals_single_rows(lm, policy):
    batch = run(lm, policy)
    for b, prompt in enumerate(PROMPTS):
        single = run(lm, policy, prompts=[prompt])
        assert single.tokens[0] == batch.tokens[b]
        assert single.exit_layers[0] == batch.exit_layers[b]


def test_host_outcome_compares_as_torch_ge():
    """The torch backend's test is read on the host: fired = confidence >= the row's threshold exactly as torch.ge
    decides it in fp32 (ties, NaN, signed zeros, values one ulp apart), running = a finite threshold (`arm`)."""
    from mexit.engines.exits import ExitState

    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=g)
    confidence = torch.cat([base, base, torch.nextafter(base, torch.zeros(64)), torch.tensor([math.nan, 0.0, -0.0,
                                                                                               math.inf, 1.0])])
    threshold = torch.cat([base, torch.nextafter(base, torch.ones(64)), base, torch.tensor([0.5, -0.0, 0.0, math.inf,
                                                                                              math.inf])])
    state = ExitState.new(len(confidence), 2, 4, (), torch.float32, "cpu", False)
    state.predicted.copy_(confidence)
    state.row_threshold.copy_(threshold)
    fired, running = state.outcome(state.tested.tolist())
    assert fired == torch.ge(confidence, threshold).tolist()
    assert running == torch.isfinite(threshold).tolist()
    assert fired[64:128] == [False] * 64 and fired[128:192] == [False] * 64 and all(fired[:64])


def test_decaying_threshold_schedule():
    policy = ExitPolicy(0.8, decay_tau=4.0, max_steps=20)
    assert policy.threshold_at(0, 99) == pytest.approx(0.8)
    assert policy.threshold_at(20, 99) == pytest.approx(0.9 * 0.8 + 0.1 * 0.8 * math.exp(-4))
    assert policy.threshold_at(10, 99) == pytest.approx(0.72 + 0.08 * math.exp(-2))
    assert ExitPolicy(0.8, decay_tau=4.0).threshold_at(5, 10) == pytest.approx(0.72 + 0.08 * math.exp(-2))
    assert ExitPolicy(0.8).threshold_at(7, 10) == 0.8


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.measure}-{p.threshold}-{p.exits}-{p.decay_tau}")
def test_decisions_respect_threshold_and_exits(lm, policy):
    out = run(lm, policy)
    checked = set(policy.exits or (1, 2, 3))
    for row_layers, row_conf in zip(out.exit_layers, out.confidences):
        for step, (layer, conf) in enumerate(zip(row_layers, row_conf)):
            assert layer == 4 or layer in checked
            assert layer >= policy.min_layer
            if layer < 4:
                assert conf >= policy.threshold_at(step, N_NEW) - 1e-7


def test_cost_is_visible(lm):
    by_prob = run(lm, ExitPolicy(0.5, "max-prob"))
    by_cos = run(lm, ExitPolicy(0.5, "cosine"))
    full_depth = sum(row.count(4) for row in by_prob.exit_layers)
    # max-prob evaluates a head for every running row at every check, plus the final head of full-depth tokens
    assert by_prob.stats["head_rows"] == by_prob.stats["checks"] + full_depth
    # cosine decides without a head: one head per token, the one that produces it
    assert by_cos.stats["head_rows"] == sum(len(row) for row in by_cos.exit_layers)
    assert by_prob.stats["blocks_run"] == sum(x for row in by_prob.exit_layers for x in row[1:])


def test_triton_backend_and_sampling(tiny_checkpoint, lm):
    policy = ExitPolicy(0.3)
    triton_lm = mexit.load(tiny_checkpoint[0], backend="triton")
    assert run(triton_lm, policy).tokens == run(lm, policy).tokens
    sampled = [run(lm, policy, do_sample=True, seed=3, top_k=20).tokens for _ in range(2)]
    assert sampled[0] == sampled[1] != run(lm, policy).tokens


@pytest.mark.parametrize("kw,message", [
    (dict(threshold=1.5), r"threshold for max-prob must be in \[0, 1\]"),
    (dict(threshold=-0.1, measure="margin"), r"threshold for margin must be in \[0, 1\]"),
    (dict(threshold=-1.5, measure="cosine"), r"threshold for cosine must be in \[-1, 1\]"),
    (dict(threshold=0.5, measure="entropy"), "unknown confidence measure 'entropy'"),
    (dict(threshold=0.5, propagation="lazy"), "unknown propagation 'lazy'"),
    (dict(threshold=0.5, decay_tau=-1), "decay_tau must be a finite number >= 0"),
    (dict(threshold=0.5, decay_tau=math.inf), "decay_tau must be a finite number >= 0"),
    (dict(threshold=0.5, exits=(4, 2, 4)), r"exits lists a layer twice: \[4, 2, 4\]"),
    (dict(threshold=0.5, min_layer=0), "min_layer must be >= 1"),
])
def test_bad_policy(kw, message):
    with pytest.raises(ValueError, match=message):
        ExitPolicy(**kw)


@pytest.mark.parametrize("kw,message", [
    (dict(exits=(2, 7)), r"exit layers \[7\] are not in this checkpoint"),
    (dict(final_head=9), "final head 9 is not an exit"),
    (dict(min_layer=9), "min_layer 9 is above"),
    (dict(exits=(4,)), "no exit to check"),
    (dict(exits=(2, 4)), r"exits \[4\] would not be checked: .* below the final head's depth 4"),  # not dropped
    (dict(exits=(1, 3), final_head=2), r"exits \[3\] would not be checked"),
    (dict(exits=(1, 3), min_layer=2), r"exits \[1\] would not be checked: .* at or above min_layer 2"),
])
def test_policy_checked_against_checkpoint(lm, kw, message):
    with pytest.raises(ValueError, match=message):
        run(lm, ExitPolicy(0.5, **kw))
    with pytest.raises(ValueError, match="do not combine"):
        lm.generate(PROMPTS, 3, early_exit=ExitPolicy(0.5), exit_layer=2)


def test_cli_early_exit_json(tiny_checkpoint, capsys):
    rc = cli_main(["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17,200,3", "--input-ids", "99",
                   "--mode", "early-exit", "--threshold", "0.3", "--exits", "1,2,3", "--measure", "max-prob",
                   "--max-new-tokens", "6", "--no-eos", "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["tokens"]) == 2 and all(len(t) == 6 for t in payload["tokens"])
    assert [len(x) for x in payload["exit_layers"]] == [6, 6] and payload["weight_bytes_ratio"] > 0
    assert main_json(tiny_checkpoint, "--max-new-tokens", "1")["weight_bytes_ratio"] is None  # no decode step: null
    expected = mexit.load(tiny_checkpoint[0]).generate([[5, 17, 200, 3], [99]], 6, eos_token_id=None,
                                                        early_exit=ExitPolicy(0.3, exits=(1, 2, 3)))
    assert payload["tokens"] == expected.tokens and payload["exit_layers"] == expected.exit_layers


def test_cli_exits_all_is_the_default_and_a_named_exit_is_checked_or_refused(tiny_checkpoint, capsys):
    base = ["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17,200,3", "--mode", "early-exit",
            "--threshold", "0.3", "--max-new-tokens", "4", "--no-eos", "--json"]
    assert cli_main(base) == 0
    default = json.loads(capsys.readouterr().out)
    assert cli_main([*base, "--exits", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["exit_layers"] == default["exit_layers"]
    assert cli_main([*base, "--exits", "2,4"]) == 2
    assert capsys.readouterr().err.startswith("error: exits [4] would not be checked")


def main_json(tiny_checkpoint, *argv) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17", "--mode",
                         "early-exit", "--threshold", "0.3", "--no-eos", "--json", *argv]) == 0
    return json.loads(out.getvalue())


def test_cli_final_head_is_the_policys(tiny_checkpoint, capsys):
    """--final-head sets the head of tokens that never exit (and the depth), as ExitPolicy(final_head=...) does:
    learned predictors trained against an exit head are usable from the command line."""
    base = ["generate", "--model", str(tiny_checkpoint[0]), "--input-ids", "5,17,200,3", "--mode", "early-exit",
            "--threshold", "0.9", "--exits", "1", "--final-head", "3", "--max-new-tokens", "5", "--no-eos", "--json"]
    assert cli_main(base) == 0
    out = json.loads(capsys.readouterr().out)
    want = mexit.load(tiny_checkpoint[0]).generate([[5, 17, 200, 3]], 5, eos_token_id=None,
                                                   early_exit=ExitPolicy(0.9, exits=(1,), final_head=3))
    assert out["tokens"] == want.tokens and out["exit_layers"] == want.exit_layers
    assert max(out["exit_layers"][0]) <= 3
    assert cli_main([*base[:-1], "--final-head", "x"]) == 2
    assert "--final-head: expected original or an exit layer, got 'x'" in capsys.readouterr().err
