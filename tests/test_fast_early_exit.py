"""Early exit on the static paths (segments, and the predicated one-piece step; what CUDA graphs capture) equals
the eager scheduler."""

import pytest
import torch
from test_early_exit import N_NEW, POLICIES, PROMPTS

import mexit
from mexit.decoding.early_exit import ExitPolicy
from mexit.engines.static import StaticState, batch_bucket
from mexit.ops.launches import count_launches

ENGINES = ["static"] + (["graph"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IDS = lambda p: f"{p.measure}-{p.threshold}-{p.exits}-{p.decay_tau}"  # noqa: E731


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    return mexit.load(tiny_checkpoint[0], device=DEVICE, engine="eager")


def static_state(lm) -> StaticState:
    (state,) = [s for s in lm._engine.states.values() if s.exits is not None]
    return state


def deferred(policy):
    return ExitPolicy(**{**policy.__dict__, "propagation": "deferred"})


def predicated(policy):
    return ExitPolicy(**{**policy.__dict__, "schedule": "predicated"})


def on_eager(policy):
    """The policy the eager engine runs as the reference: its own scheduler (segments) for either schedule."""
    return ExitPolicy(**{**policy.__dict__, "schedule": "segments"})


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("variant", ["segments", "deferred", "predicated"])
@pytest.mark.parametrize("policy", POLICIES + [ExitPolicy(1.0), ExitPolicy(0.0, exits=(2,))], ids=IDS)
def test_equals_eager_scheduler(tiny_checkpoint, eager, engine, variant, policy):
    policy = {"segments": policy, "deferred": deferred(policy), "predicated": predicated(policy)}[variant]
    backend = "triton" if variant == "predicated" else "torch"  # predication needs the kernels' skip flag
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine, backend=backend)
    assert_same_run(fast, eager, PROMPTS, policy, engine)
    assert static_state(fast).predicated == (variant == "predicated")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("variant", ["segments", "predicated"])
@pytest.mark.parametrize("policy", [POLICIES[0], POLICIES[5], ExitPolicy(0.0, exits=(2,))], ids=IDS)
def test_gemv_blocks_equal_eager_scheduler(tiny_checkpoint, eager, engine, variant, policy):
    """Early exit on the loop-free GEMV block linears (the predicated schedule: their skip flags and frozen rows)
    decodes the eager scheduler's tokens."""
    policy = policy if variant == "segments" else predicated(policy)
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine, backend="triton", gemv_max_rows=8)
    with count_launches() as launched:
        assert_same_run(fast, eager, PROMPTS, policy, engine)
    if engine == "static":
        assert launched["triton:_fused_gemv"] > 0 and launched["triton:_fused_linear"] == 0


@pytest.mark.parametrize("variant,backend", [("segments", "torch"), ("deferred", "torch"), ("segments", "triton"),
                                             ("deferred", "triton"), ("predicated", "triton")])
def test_single_row_equals_eager_scheduler(tiny_checkpoint, eager, variant, backend):
    """Batch bucket 1 (the segment schedule then runs without per-block predication); on the triton backend the
    fills are the propagate_kv kernel."""
    policy = ExitPolicy(0.15, exits=(1, 2, 3))
    policy = {"segments": policy, "deferred": deferred(policy), "predicated": predicated(policy)}[variant]
    for engine in ENGINES:
        fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine, backend=backend)
        with count_launches() as launched:  # counted on the static engine: graph replays launch nothing it sees
            for prompt in PROMPTS:
                assert_same_run(fast, eager, [prompt], policy, engine)
        fills = launched["triton:_propagate_kv"]
        if engine == "static":  # predicated: fills inside the blocks
            assert (fills > 0) == (backend == "triton" and variant != "predicated")


def assert_same_run(fast, eager, prompts, policy, engine):
    """Tokens, exit layers, confidences and the KV cache of the static engine equal the eager scheduler's."""
    ours = fast.generate(prompts, N_NEW, eos_token_id=None, early_exit=policy)
    theirs = eager.generate(prompts, N_NEW, eos_token_id=None, early_exit=on_eager(policy), return_cache=True)
    assert ours.engine == engine
    assert ours.tokens == theirs.tokens
    assert ours.exit_layers == theirs.exit_layers
    for a, b in zip(ours.confidences, theirs.confidences):
        assert a == pytest.approx(b, abs=1e-5)
    # the cache: predicated blocks and the fill step give the eager scheduler's propagated keys/values
    (state,) = [s for key, s in fast._engine.states.items()
                if key.mode == policy and key.batch == batch_bucket(len(prompts))]
    if state.pending is not None:
        state.pending.flush()
    longest = max(map(len, prompts))
    used = longest + N_NEW - 1
    for b in range(len(prompts)):
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
@pytest.mark.parametrize("schedule", ["segments", "predicated"])
def test_sampling_and_eos(tiny_checkpoint, eager, engine, schedule):
    backend = "triton" if schedule == "predicated" else "torch"
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine, backend=backend)
    policy = ExitPolicy(0.3, schedule=schedule)
    kw = dict(do_sample=True, seed=9, top_k=30, eos_token_id=None)
    assert (fast.generate(PROMPTS, N_NEW, early_exit=policy, **kw).tokens
            == eager.generate(PROMPTS, N_NEW, early_exit=on_eager(policy), **kw).tokens)
    free = eager.generate(PROMPTS, 20, eos_token_id=None, early_exit=on_eager(policy)).tokens
    eos = free[2][4]
    stopped = fast.generate(PROMPTS, 20, eos_token_id=eos, early_exit=policy)
    expected = eager.generate(PROMPTS, 20, eos_token_id=eos, early_exit=on_eager(policy))
    assert stopped.tokens == expected.tokens and stopped.exit_layers == expected.exit_layers


@pytest.mark.parametrize("engine", ENGINES)
def test_deferred_fills_only_when_a_deep_token_needs_it(tiny_checkpoint, engine):
    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine=engine)
    shallow = fast.generate([PROMPTS[0]], N_NEW, eos_token_id=None,
                            early_exit=ExitPolicy(0.0, exits=(2,), propagation="deferred"))
    assert shallow.stats["weight_fill_blocks"] == 0 and shallow.stats["fills"] == 0  # nothing ever runs block 3
    assert len(static_state(fast).pending.entries) == N_NEW - 1
    mixed = fast.generate(PROMPTS, N_NEW, eos_token_id=None, early_exit=deferred(ExitPolicy(0.3)))
    eager_fill = fast.generate(PROMPTS, N_NEW, eos_token_id=None, early_exit=ExitPolicy(0.3))
    assert mixed.tokens == eager_fill.tokens
    assert mixed.stats["weight_fill_blocks"] <= eager_fill.stats["weight_fill_blocks"]


def test_predicated_step_is_one_piece(tiny_checkpoint):
    """No host read, one piece per step; every block's four fused kernels and every head launch on each step
    (those past the exit return at once); the weight reads derived from the exits equal the segment schedule's.
    Counted on the static engine (the step a graph captures, uncaptured)."""
    folder = tiny_checkpoint[0]
    segments = mexit.load(folder, device=DEVICE, engine="static", backend="triton")
    fast = mexit.load(folder, device=DEVICE, engine="static", backend="triton")
    steps = N_NEW - 1
    for policy in (ExitPolicy(0.0, exits=(1, 2, 3)), ExitPolicy(0.9, measure="cosine")):  # all exit at 1; mixed
        with count_launches() as launched:
            out = fast.generate(PROMPTS, N_NEW, eos_token_id=None, early_exit=predicated(policy))
        assert launched["triton:_fused_linear"] == 4 * 4 * steps  # 4 blocks x 4 matmuls, decode steps only
        # 3 checked exits (or cosine's heads) + the final head; one decision per checked exit and the final one
        # (it emits); the prompt's step included
        assert launched["triton:_exit_head_merge"] == 4 * N_NEW
        assert launched["triton:_exit_decide"] == 4 * N_NEW
        assert out.stats["host_reads"] == 0 and out.stats["segments"] == 0
        reference = segments.generate(PROMPTS, N_NEW, eos_token_id=None, early_exit=policy)
        assert out.tokens == reference.tokens and out.exit_layers == reference.exit_layers
        keys = ("steps", "weight_blocks", "weight_heads", "weight_fill_blocks")
        assert {k: out.stats[k] for k in keys} == {k: reference.stats[k] for k in keys}


def test_predicated_needs_triton_and_eager_propagation(tiny_checkpoint):
    with pytest.raises(ValueError, match="deferred propagation needs schedule='segments'"):
        ExitPolicy(0.5, propagation="deferred", schedule="predicated")
    with pytest.raises(ValueError, match="unknown schedule"):
        ExitPolicy(0.5, schedule="graph")
    lm = mexit.load(tiny_checkpoint[0], device=DEVICE, engine="static", backend="torch")
    with pytest.raises(ValueError, match="predicated early-exit schedule needs backend='triton'"):
        lm.generate(PROMPTS, 4, early_exit=ExitPolicy(0.5, schedule="predicated"))
    lm.engine = "eager"  # not ignored there: refused by name, as a policy and as a mode string
    for mode in (dict(early_exit=ExitPolicy(0.5, schedule="predicated")), dict(mode="ee:max-prob:0.5:predicated")):
        with pytest.raises(ValueError, match="schedule='predicated' is a static-engine schedule: use engine="):
            lm.generate(PROMPTS, 4, **mode)


def test_predicated_garbage_never_reaches_a_kept_value(tiny_checkpoint, eager, monkeypatch):
    """Every buffer allocated during generation starts as NaN (-7 for integers): outputs the skip flags leave
    unwritten stay poison, and the tokens, exits and confidences still equal the eager scheduler's."""
    from kernel_utils import poisoned_allocations

    fast = mexit.load(tiny_checkpoint[0], device=DEVICE, engine="static", backend="triton")
    policy = ExitPolicy(0.15, exits=(1, 2, 3))  # steps where every row exits early, and steps where one does not
    kw = dict(eos_token_id=None, do_sample=True, seed=3, top_k=20)
    with poisoned_allocations(monkeypatch):
        ours = fast.generate(PROMPTS, N_NEW, early_exit=predicated(policy), **kw)
    theirs = eager.generate(PROMPTS, N_NEW, early_exit=policy, **kw)
    assert ours.tokens == theirs.tokens and ours.exit_layers == theirs.exit_layers
    assert not any(c != c for row in ours.confidences for c in row)  # no NaN confidence
    deepest = [max(row[i] for row in ours.exit_layers) for i in range(1, N_NEW)]
    assert min(deepest) < 4  # a decode step where every row exited: its later blocks and heads were skipped
