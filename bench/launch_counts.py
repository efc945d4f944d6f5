"""Launches per decode step of gpt2-medium-multiexit's structure (24 blocks, exits 2, 4, ..., 24), per mode and
batch bucket, with each mode's budget: static engine, triton backend (the step CUDA graphs capture, uncaptured).

    TRITON_INTERPRET=1 python -m mexit.bench.launch_counts [--batch 1 16] [--out DIR]    # CPU: the interpreter

Counts depend on the structure only (blocks, exits, batch bucket), not the width, so the model here is
gpt2-medium's depth and exits at width 64 with a 512-token vocabulary (RANDOM weights): exact, and quick under the
interpreter. A count is Triton launches plus kernel-launching torch operations (`mexit/ops/launches.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

N_LAYER = 24
EXITS = tuple(range(2, 25, 2))


def modes() -> dict:
    """name -> (generate kwargs, budget): 5 launches per executed block plus the mode's fixed part."""
    from mexit.decoding.early_exit import ExitPolicy

    def ee(threshold, exits, schedule="segments", measure="max-prob"):
        return dict(early_exit=ExitPolicy(threshold, measure, exits=exits, schedule=schedule))

    # + 1 per step (predicated: per run of blocks): the non-finite state check (kernels/check_states.py)
    return {
        "original": ({}, 5 * 24 + 3 + 1),
        "exit 12": (dict(exit_layer=12), 5 * 12 + 3 + 1),
        "ACD (24, 12)": (dict(contrast=(24, 12)), 5 * 24 + 4 + 2),
        "early exit, predicated, checks at 6, 12, 18": (ee(0.5, (6, 12, 18), "predicated"), 5 * 24 + 3 * 3 + 3 + 4),
        "early exit, predicated, every exit checked": (ee(0.5, EXITS[:-1], "predicated"),
                                                       5 * 24 + 3 * 11 + 3 + 12),
        "early exit, segments, all exit at 8": (ee(0.0, (8,)), 5 * 8 + 3 + 3 + 1),
        "early exit, segments, checks at 6, 12, 18, none exits": (ee(1.0, (6, 12, 18)),
                                                                   5 * 24 + 3 * 3 + 3 * 4 + 1),
        # per check: the decision with the predictor, the fired rows' head (2 kernels, reading nothing when no
        # row fired) and one torch `where` giving them its token
        "learned early exit, predicated, checks at 6, 12, 18": (ee(0.5, (6, 12, 18), "predicated", "learned"),
                                                                5 * 24 + 3 * 4 + 3 + 4),
        "learned early exit, segments, checks at 6, 12, 18, none exits": (ee(1.0, (6, 12, 18), "segments",
                                                                             "learned"), 5 * 24 + 3 * 2 + 3 + 1),
        "sampling (top-k 50), original": (dict(do_sample=True, top_k=50, seed=0), None),
        "original, repetition penalty 1.2 and no_repeat_ngram_size 3": (
            dict(repetition_penalty=1.2, no_repeat_ngram_size=3), None),
    }


def count(batches: list[int], only: list[str] | None = None) -> list[dict]:
    import mexit
    from mexit.bench.common import launches_per_step
    from mexit.model.config import ModelConfig

    config = ModelConfig(n_layer=N_LAYER, n_embd=64, n_head=4, vocab_size=512, n_positions=256, exit_layers=EXITS,
                         eos_token_id=511)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = mexit.MultiExitLM.random(config, device=device, backend="triton", engine="static", fused_max_rows=64)
    rows = []
    for batch in batches:
        prompts = [[(5 * r + t) % 500 + 1 for t in range(6)] for r in range(batch)]
        for name, (kw, budget) in modes().items():
            if only and not any(word in name for word in only):
                continue
            counted = launches_per_step(lm, prompts, kw, steps=2)
            rows.append(dict(mode=name, batch=batch, triton=counted["triton"], torch=counted["torch"],
                             launches=counted["launches"], budget=budget,
                             within=None if budget is None else counted["launches"] <= budget))
            print(f"  {name} B={batch}: {counted['launches']:g}", file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | batch | Triton + torch = launches | budget |", "|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']} ({'within' if r['within'] else 'OVER'})"
        counts = f"{r['triton']:g} + {r['torch']:g} = {r['launches']:g}"
        lines.append(f"| {r['mode']} | {r['batch']} | {counts} | {budget} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (buckets 1..64)")
    p.add_argument("--modes", nargs="+", help="only the modes whose name contains one of these words")
    p.add_argument("--out", help="folder for launch_counts.json and launch_counts.md")
    args = p.parse_args(argv)
    rows = count(args.batch, args.modes)
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "launch_counts.json").write_text(json.dumps(rows, indent=1))
        (out / "launch_counts.md").write_text(table + "\n")
    return 0 if all(r["within"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
