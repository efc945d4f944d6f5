"""Launch counts per decode step: the dispatch-mode count equals an independent count (torch's profiler for
torch operations; the kernels' own wrapper counters for Triton launches), on the static engine, both backends,
batch 1 and 8, for the original head, an exit, ACD and early exit."""

from collections import Counter

import pytest
import torch

import mexit
from mexit.bench.common import launches_per_step
from mexit.decoding.early_exit import ExitPolicy
from mexit.ops.launches import count_launches, total

MODES = {"original": {}, "exit": dict(exit_layer=2), "acd": dict(contrast=(4, 2)),
         "early-exit": dict(early_exit=ExitPolicy(0.0, exits=(2,)))}
NOT_KERNELS = {"view", "slice", "select", "transpose", "unsqueeze", "expand", "as_strided", "t", "_unsafe_view",
               "permute", "split", "unbind", "squeeze", "alias", "reshape", "narrow", "detach", "detach_", "empty",
               "empty_like", "empty_strided", "_local_scalar_dense", "item", "lift_fresh", "expand_as", "view_as",
               "contiguous", "split_with_sizes", "chunk", "resolve_conj", "resolve_neg", "_reshape_alias", "to",
               "flatten", "is_nonzero", "size", "stride", "promote_types", "result_type", "can_cast", "set_",
               "numpy_T", "mT", "adjoint"}
# Triton kernels each wrapper launches (at these short cache lengths decode attention does not split)
KERNELS_PER_CALL = {"fused_linear": 1, "decode_attention": 1, "exit_head": 2, "acd_contrast": 2, "propagate_kv": 1,
                    "exit_decide": 1, "step_epilogue": 1, "check_states": 1}


def profiler_ops(lm, prompts, n, kw) -> int:
    """Top-level aten ops that launch a kernel, from torch.profiler's event tree (names, not the dispatcher)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        lm.generate(prompts, n, eos_token_id=None, **kw)
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name[6:] in NOT_KERNELS:
            continue
        parent = event.cpu_parent
        while parent is not None and not (parent.name.startswith("aten::") and parent.name[6:] not in NOT_KERNELS):
            parent = parent.cpu_parent
        count += parent is None
    return count


def count_wrapper_calls(monkeypatch) -> Counter:
    """Count the kernels the wrappers launch (each kernel module's wrapper function, replaced by a counting one):
    an independent count of the Triton launches."""
    import importlib

    calls = Counter()
    def counting(run, per):
        def counted(*args, **kwargs):
            calls["kernels"] += per
            return run(*args, **kwargs)
        return counted

    for name, per in KERNELS_PER_CALL.items():
        module = importlib.import_module(f"mexit.kernels.{name}")
        monkeypatch.setattr(module, name, counting(getattr(module, name), per))
    return calls


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["original", "exit", "acd", "early-exit"])
def test_torch_ops_match_the_profiler(tiny_checkpoint, mode, batch):
    lm = mexit.load(tiny_checkpoint[0], engine="static")
    prompts = [[1 + r, 2, 3] for r in range(batch)]
    kw = MODES[mode]
    counted = launches_per_step(lm, prompts, kw)
    profiled = (profiler_ops(lm, prompts, 4, kw) - profiler_ops(lm, prompts, 1, kw)) / 3
    assert counted["triton"] == 0 and counted["launches"] == profiled > 0


@pytest.mark.parametrize("mode,batch", [("original", 1), ("original", 8), ("exit", 1), ("acd", 1),
                                        ("early-exit", 1), ("early-exit", 8)])
def test_triton_launches_match_the_wrapper_counters(tiny_checkpoint, mode, batch, monkeypatch):
    lm = mexit.load(tiny_checkpoint[0], backend="triton", engine="static", fused_max_rows=64)
    prompts = [[1 + r, 2, 3] for r in range(batch)]
    kw = MODES[mode]
    with torch.inference_mode():
        lm.generate(prompts, 2, eos_token_id=None, **kw)
        calls = count_wrapper_calls(monkeypatch)
        with count_launches() as counts:
            lm.generate(prompts, 2, eos_token_id=None, **kw)
    assert total(counts)["triton"] == calls["kernels"] > 0


@pytest.mark.parametrize("mode,depth", [("original", 4), ("exit", 2)])
def test_fused_step_is_five_kernels_per_block_plus_the_exit_stage(tiny_checkpoint, mode, depth):
    """5 kernels per block, the exit stage's 2, and the non-finite state check of the step's one run of blocks."""
    lm = mexit.load(tiny_checkpoint[0], backend="triton", engine="static", fused_max_rows=64)
    assert launches_per_step(lm, [[1, 2, 3]], MODES[mode], steps=1)["triton"] == 5 * depth + 2 + 1


def predicated(threshold, exits, measure="max-prob"):
    return ExitPolicy(threshold, measure, exits=exits, schedule="predicated")


# mode -> (generate kwargs, launch budget for the tiny 4-layer model: 5 per block executed plus the mode's extra,
# plus the non-finite state check: once per step on the segment schedule, per run of blocks on the predicated one)
BUDGETS = {
    "original": ({}, 5 * 4 + 3 + 1),
    "exit 2": (dict(exit_layer=2), 5 * 2 + 3 + 1),
    "ACD (4, 2)": (dict(contrast=(4, 2)), 5 * 4 + 4 + 2),
    "predicated, 1 check": (dict(early_exit=predicated(0.5, (2,))), 5 * 4 + 3 * 1 + 3 + 2),
    "predicated, 3 checks": (dict(early_exit=predicated(0.5, (1, 2, 3))), 5 * 4 + 3 * 3 + 3 + 4),
    "segments, all exit at 2": (dict(early_exit=ExitPolicy(0.0, exits=(2,))), 5 * 2 + 3 + 3 + 1),  # one segment runs
    "segments, none exits": (dict(early_exit=ExitPolicy(1.0, exits=(2,))), 5 * 4 + 3 + 3 * 2 + 1),  # both run
    # learned: a check is its decision kernel (the predictor inside), plus the fired rows' head (2) and one torch
    # `where` on the predicated schedule
    "learned, predicated, 3 checks": (dict(early_exit=predicated(0.5, (1, 2, 3), "learned")), 5 * 4 + 4 * 3 + 3 + 4),
    "learned, segments, none exits": (dict(early_exit=ExitPolicy(1.0, "learned", exits=(2,))),
                                      5 * 4 + 3 + 1 + 3 + 1),
}


@pytest.mark.parametrize("mode,batch", [(mode, 1) for mode in BUDGETS]
                         + [("ACD (4, 2)", 3), ("predicated, 3 checks", 16), ("segments, none exits", 7),
                            ("original", 17)])  # buckets 1, 4, 8, 16, 32 (the 17-64 row regime)
def test_decode_step_holds_its_launch_budget(tiny_checkpoint, mode, batch):
    """Static engine, triton backend: one greedy decode step is kernels only (no torch operation at all) and stays
    within the mode's budget: 5 launches per block, +3 for one head (tiles, merge that emits, or its decision), +4
    for ACD, +3 per checked exit (head, merge, decision), segments +3 per executed segment, +1 per run of blocks
    (the non-finite state check; on the segment schedule once per step, where its states end). The count depends on
    the structure, not the batch (bench/launch_counts.py: the same at 1 and 16 for every mode): every mode at
    batch 1, and a mode per larger bucket (bench/launch_counts.py counts gpt2-medium's structure at any batch)."""
    lm = mexit.load(tiny_checkpoint[0], backend="triton", engine="static", fused_max_rows=64)
    kw, budget = BUDGETS[mode]
    counted = launches_per_step(lm, [[1 + r, 2, 3] for r in range(batch)], kw, steps=1)
    torch_ops = 1 if "segments" in mode else 3 if mode.startswith("learned, predicated") else 0  # h copy; `where`s
    assert counted["torch"] <= torch_ops, counted
    assert counted["launches"] <= budget, counted


@pytest.mark.parametrize("engine", ["static", "eager"])
@pytest.mark.parametrize("measure,per_check", [("learned", 4), ("cosine", 4), ("max-prob", 14)])
def test_a_check_that_does_not_fire_costs_its_test(tiny_checkpoint, engine, measure, per_check):
    """Torch backend, no row reaches the threshold: a check is its confidence (learned: layernorm, addmv, sigmoid;
    cosine: its saved state, the similarity; max-prob: the exit's head), plus the static engine's hand-over copy (the
    eager engine: one fewer), and one host read that compares it with the rows' thresholds; the decision's
    bookkeeping (`exit_decide`) runs only when a row fires. Counted as the difference between three checks and one,
    and the whole step against the original head's at batch 1 (the final decision's few operations; frozen rows add
    their masks to larger static batches)."""
    lm = mexit.load(tiny_checkpoint[0], engine=engine)
    for prompts in ([[1, 2, 3]], [[1, 2, 3], [4, 5]]):
        ops = {exits: launches_per_step(lm, prompts, dict(early_exit=ExitPolicy(1.0, measure, exits=exits)))
               for exits in ((2,), (1, 2, 3))}
        assert (ops[(1, 2, 3)]["launches"] - ops[(2,)]["launches"]) / 2 <= per_check - (engine == "eager"), ops
    one = launches_per_step(lm, [[1, 2, 3]], dict(early_exit=ExitPolicy(1.0, measure, exits=(2,))))["launches"]
    assert one - per_check - launches_per_step(lm, [[1, 2, 3]], {})["launches"] <= 10
