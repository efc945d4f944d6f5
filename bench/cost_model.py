"""The cost model: weight bytes per token that the settings measured on a small model would read on
gpt2-medium-multiexit (24 blocks, 50257 x 1024 heads, fp16).

    mexit ablate --model bench/small_model_12l --batch 1 --spec 2:1 --draft-vocab 0 256 --out runs/a
    python -m mexit.bench.cost_model runs/a/ablation.jsonl [--out DIR]        # or a latency.json of mexit bench

Each row of `mexit ablate` (real prompts) and each `mexit` row of `mexit bench` (random prompts) carries what one
decode step read, measured: blocks, heads (fractions for restricted draft heads), key/value-propagated blocks and
learned predictors per step (speculative decoding: per generated token of a row). Those come from the small
model's measured exit-layer and acceptance distributions.
The projection keeps the relative depths (a block count scales by 24 / the small model's layers) and the head,
propagation and predictor counts, and prices them at gpt2-medium's sizes with `mexit.decoding.stats.weight_bytes`.
The ratio is against full depth (24 blocks and the original head). Weights only: the KV cache and activations are
left out, as in the statistics' `weight_bytes_ratio`. The projection assumes the real checkpoint exits and accepts
at the same relative depths; measure it there when the weights are at hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ["setting", "batch", "blocks_per_step", "heads_per_step", "fill_blocks_per_step", "predictors_per_step",
           "acceptance_rate", "small_ratio", "medium_mb_per_token", "medium_ratio"]


def project(rows: list[dict], dtype_bytes: int = 2) -> list[dict]:
    """Rows of `mexit ablate` or `mexit bench` (mexit's, with their traffic) -> the projected rows (see the module
    docstring)."""
    import torch

    from mexit.decoding.stats import weight_bytes
    from mexit.model.config import GPT2_MEDIUM_MULTIEXIT as MEDIUM

    dtype = {2: torch.float16, 4: torch.float32}[dtype_bytes]
    full = weight_bytes(MEDIUM, dtype, MEDIUM.n_layer, 1)
    out = []
    for r in rows:
        if r.get("impl", "mexit") != "mexit" or "blocks_per_step" not in r:
            continue
        scale = MEDIUM.n_layer / r["n_layer"]
        spent = weight_bytes(MEDIUM, dtype, r["blocks_per_step"] * scale, r["heads_per_step"],
                             r["fill_blocks_per_step"] * scale, r["predictors_per_step"])
        setting = r["mode"] if "mode" in r else " ".join(
            str(x) for x in (r["measure"], r["threshold"], r["exits"], f"k={r['draft_len']}" if r.get("draft_len")
                             else "") if x is not None and x != "")
        out.append(dict(setting=setting, batch=r["batch"], model=r["model"], n_layer=r["n_layer"],
                        blocks_per_step=r["blocks_per_step"], heads_per_step=r["heads_per_step"],
                        fill_blocks_per_step=r["fill_blocks_per_step"], predictors_per_step=r["predictors_per_step"],
                        small_ratio=r.get("weight_bytes_ratio"), acceptance_rate=r.get("acceptance_rate"),
                        medium_mb_per_token=spent / 1e6, medium_ratio=spent / full))
    return out


def markdown(rows: list[dict]) -> str:
    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="an ablation.jsonl of `mexit ablate` or a latency.json of `mexit bench`")
    p.add_argument("--dtype-bytes", type=int, default=2, choices=[2, 4], help="gpt2-medium's weights: fp16 or fp32")
    p.add_argument("--out", help="folder for cost_model.json and cost_model.md (default: print only)")
    args = p.parse_args(argv)
    path = Path(args.results)
    if not path.is_file():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    try:
        text = path.read_text()
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
        rows = project(rows, args.dtype_bytes)
    except (ValueError, KeyError, TypeError) as err:
        print(f"error: {path} is not results of `mexit ablate` / `mexit bench` with traffic columns ({err})",
              file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {path} holds no mexit row with traffic columns (rerun `mexit ablate` or `mexit bench`)",
              file=sys.stderr)
        return 2
    table = markdown(rows)
    print(f"projected to gpt2-medium-multiexit (24 blocks, heads 50257 x 1024, {args.dtype_bytes}-byte weights) "
          f"from {path}\n\n{table}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost_model.json").write_text(json.dumps(rows, indent=1, allow_nan=False))
        (out / "cost_model.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
