"""Early exit on the static segment path (what CUDA graphs capture) equals the eager scheduler."""

import pytest
import torch
from test_early_exit import N_NEW, POLICIES, PROMPTS

import mexit
from mexit.early_exit import ExitPolicy
from mexit.fast_early_exit import StaticEarlyExit

ENGINES = ["static"] + (["graph"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IDS = lambda p: f"{p.measure}-{p.threshold}-{p.exits}-{p.decay_tau}"  # noqa: E731


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    return mexit.load(tiny_checkpoint[0], device=DEVICE, engine="eager")


def static_state(lm) -> StaticEarlyExit:
    (state,) = [s for s in lm._static_steps.values() if isinstance(s, StaticEarlyExit)]
    return state


def deferred(policy):
    return ExitPolicy(**{**policy.__dict__, "propagation": "deferred"})


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("propagation", ["eager", "deferred"])
@pytest.mark.parametrize("policy", POLICIES + [ExitPolicy(1.0), ExitPolicy(0.0, exits=(2,))], ids=IDS)
def test_equals_eager_scheduler(tiny_checkpoint, eager, engine, propagation, policy):
    if propagation == "deferred":
        policy = deferred(policy)
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    ours = fast.generate(PROMPTS, N_NEW, eos_token_id=None, early_exit=policy)
    theirs = eager.generate(PROMPTS, N_NEW, eos_token_id=None, early_exit=policy, return_cache=True)
    assert ours.engine == engine
    assert ours.tokens == theirs.tokens
    assert ours.exit_layers == theirs.exit_layers
    for a, b in zip(ours.confidences, theirs.confidences):
        assert a == pytest.approx(b, abs=1e-5)
    # the cache: predicated blocks and the fill step give the eager scheduler's propagated keys/values
    state = static_state(fast)
    state.flush_pending()
    longest = max(map(len, PROMPTS))
    used = longest + N_NEW - 1
    for b in range(len(PROMPTS)):
        valid = theirs.cache.valid[b, :used]
        for ours_kv, theirs_kv in ((state.cache.k, theirs.cache.k), (state.cache.v, theirs.cache.v)):
            torch.testing.assert_close(ours_kv[:, b, :, :used][:, :, valid], theirs_kv[:, b, :, :used][:, :, valid],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_reads_and_launches(tiny_checkpoint, eager, engine):
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    steps = N_NEW - 1
    always, never = ExitPolicy(0.0, exits=(1, 2, 3)), ExitPolicy(1.0, exits=(1, 2, 3))
    # every token exits at the first check: one segment, one host read and one fill per step
    out = fast.generate([PROMPTS[0]], N_NEW, eos_token_id=None, early_exit=always)
    assert out.stats["segments"] == steps and out.stats["host_reads"] == steps and out.stats["fills"] == steps
    weights = dict(steps=steps, weight_blocks=steps, weight_heads=steps, weight_fill_blocks=3 * steps)
    for lm in (fast, eager):  # both schedulers count the same weight reads (batch 1)
        stats = lm.generate([PROMPTS[0]], N_NEW, eos_token_id=None, early_exit=always).stats
        assert {k: stats[k] for k in weights} == weights
    out = fast.generate([PROMPTS[0]], N_NEW, eos_token_id=None, early_exit=never)
    assert out.stats["segments"] == 4 * steps and out.stats["host_reads"] == 3 * steps and out.stats["fills"] == 0
    weights = dict(steps=steps, weight_blocks=4 * steps, weight_heads=4 * steps, weight_fill_blocks=0)
    for lm in (fast, eager):
        stats = lm.generate([PROMPTS[0]], N_NEW, eos_token_id=None, early_exit=never).stats
        assert {k: stats[k] for k in weights} == weights


@pytest.mark.parametrize("engine", ENGINES)
def test_sampling_and_eos(tiny_checkpoint, eager, engine):
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    policy = ExitPolicy(0.3)
    kw = dict(do_sample=True, seed=9, top_k=30, eos_token_id=None, early_exit=policy)
    assert fast.generate(PROMPTS, N_NEW, **kw).tokens == eager.generate(PROMPTS, N_NEW, **kw).tokens
    free = eager.generate(PROMPTS, 30, eos_token_id=None, early_exit=policy).tokens
    eos = free[2][4]
    stopped = fast.generate(PROMPTS, 30, eos_token_id=eos, early_exit=policy)
    expected = eager.generate(PROMPTS, 30, eos_token_id=eos, early_exit=policy)
    assert stopped.tokens == expected.tokens and stopped.exit_layers == expected.exit_layers


@pytest.mark.parametrize("engine", ENGINES)
def test_deferred_fills_only_when_a_deep_token_needs_it(tiny_checkpoint, engine):
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    shallow = fast.generate([PROMPTS[0]], N_NEW, eos_token_id=None,
                            early_exit=ExitPolicy(0.0, exits=(2,), propagation="deferred"))
    assert shallow.stats["weight_fill_blocks"] == 0 and shallow.stats["fills"] == 0  # nothing ever runs block 3
    assert len(static_state(fast).pending) == N_NEW - 1
    mixed = fast.generate(PROMPTS, N_NEW, eos_token_id=None, early_exit=deferred(ExitPolicy(0.3)))
    eager_fill = fast.generate(PROMPTS, N_NEW, eos_token_id=None, early_exit=ExitPolicy(0.3))
    assert mixed.tokens == eager_fill.tokens
    assert mixed.stats["weight_fill_blocks"] <= eager_fill.stats["weight_fill_blocks"]
