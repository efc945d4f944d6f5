"""Compare decoding modes on one checkpoint: what ACD and single exits do to the text, greedy.

    python -m mexit.bench.compare_modes --model bench/small_model --prompts bench/shakespeare_prompts.txt \\
        --modes original exit:4 exit:6 acd:8,2 acd:8,4 acd:8,6 acd:original,4

Per mode over the prompts: the full model's mean log-likelihood of the output (original head; how plausible the
full model finds it), 4-gram repetition rate, distinct bigrams, mean length before eos, and one sample. Writes
compare.json and compare.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mexit.bench.ablate import continuation_loglik, encode, read_prompts, repetition_rate
from mexit.bench.common import markdown_table, run_metadata, script_main, write_results
from mexit.decoding import modes
from mexit.decoding.early_exit import ExitPolicy
from mexit.decoding.speculative import Speculation

COLUMNS = ["mode", "loglik", "repetition", "distinct_2", "mean_length"]


def distinct(tokens: list[int], n: int = 2) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def compare(args) -> list[dict]:
    import mexit

    lm = mexit.load(args.model, device=args.device)
    ids, encoding = encode(lm, read_prompts(args.prompts), args.max_new_tokens, args.prompts)
    meta = dict(run_metadata(lm.model.device, lm.model.dtype), model=str(args.model), encoding=encoding,
                prompts=str(args.prompts), max_new_tokens=args.max_new_tokens)
    rows = []
    for mode in args.modes:
        settings = modes.parse(mode, lm.config)
        if isinstance(settings, (ExitPolicy, Speculation)):
            raise ValueError(f"mode {mode!r}: compare fixed modes (original, exit:L, acd:U,L)")
        out = lm.generate(ids, args.max_new_tokens, eos_token_id=None, mode=settings)
        tokens = out.tokens
        rows.append(dict(
            meta, mode=mode,
            loglik=sum(continuation_loglik(lm, p, t) for p, t in zip(ids, tokens)) / len(ids),
            repetition=sum(map(repetition_rate, tokens)) / len(tokens),
            distinct_2=sum(map(distinct, tokens)) / len(tokens),
            mean_length=sum(map(len, tokens)) / len(tokens),
            sample=out.text[0] if out.text else tokens[0]))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="multi-exit checkpoint folder")
    p.add_argument("--prompts", required=True,
                   help="prompts file as --prompts-file takes it: text, one per line, or JSON lines")
    p.add_argument("--modes", nargs="+", required=True, help="original, exit:L, acd:UPPER,LOWER")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="compare_results", help="output folder")


def main_args(args) -> int:
    rows = compare(args)
    write_results(rows, args.out, "compare")
    table = markdown_table(rows, COLUMNS)
    samples = "\n".join(f"- `{r['mode']}`: {r['sample']!r}" for r in rows)
    (Path(args.out) / "compare.md").write_text(f"{table}\n\nFirst prompt's continuation:\n{samples}\n")
    print(table)
    print(samples)
    return 0


def main(argv=None) -> int:
    return script_main(__doc__, add_arguments, main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
