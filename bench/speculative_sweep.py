"""Self-speculative decoding sweep: which draft exit, draft length and threshold pay on a checkpoint.

    python -m mexit.bench.speculative_sweep --model bench/small_model --draft-lens 1 2 3 4 6 8 --thresholds none 0.5

For every (draft exit, k, threshold, draft vocabulary) over the prompt file, greedy, against full-depth decoding of
the same target (`--target`: the original head, an exit or ACD) on the same prompts: acceptance rate and tokens per
verification; the exact cost per generated token relative to full depth (weight bytes from the run's block and head
passes, and launches counted by mexit/ops/launches.py: Triton kernels plus kernel-launching torch ops); and the
measured speed-up, timed interleaved with full depth (`mexit.timing.interleaved_pairs`; the geometric mean of the
pairs' ratios with its 95% interval). Every setting's tokens are checked against full depth (lossless). Writes
speculative.json / .csv / .md."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from mexit.bench.ablate import default_prompts, encode, number, read_prompts
from mexit.bench.common import (
    add_subcommand,
    markdown_table,
    run_metadata,
    script_main,
    set_threads,
    write_results,
)
from mexit.bench.findings import speedup_interval
from mexit.frontends.cli import add_load_args, hub_kwargs
from mexit.timing import DeviceClock, interleaved_pairs

COLUMNS = ["target", "draft_exit", "draft_len", "draft_threshold", "draft_vocab", "acceptance_rate",
           "tokens_per_verification",
           "weight_bytes_ratio", "launches_ratio", "speedup", "speedup_lo", "speedup_hi", "lossless"]


def run_all(lm, ids, max_new, batch, **kw):
    """Generate every prompt (`batch` per call); returns (tokens, the runs' results, seconds)."""
    import torch

    clock = DeviceClock(lm.model.device)
    results, tokens = [], []
    if clock.cuda:
        torch.cuda.synchronize()
    start = clock.mark()
    for i in range(0, len(ids), batch):
        out = lm.generate(ids[i:i + batch], max_new, eos_token_id=None, **kw)
        results.append(out)
        tokens += out.tokens
    return tokens, results, clock.ms(start, clock.mark()) / 1e3


def launches_per_token(lm, ids, max_new, batch, **kw) -> float:
    import torch

    from mexit.ops.launches import count_launches, total

    with torch.inference_mode(), count_launches() as counts:
        tokens, _, _ = run_all(lm, ids, max_new, batch, **kw)
    return total(counts)["launches"] / (sum(map(len, tokens)) / batch)


def sweep(args) -> list[dict]:
    import mexit
    from mexit.decoding import modes
    from mexit.decoding.speculative import Speculation, SpeculativeConfig
    from mexit.model.placement import resolve_device

    device = resolve_device(args.device)
    set_threads(args.threads, device)
    lm = mexit.load(args.model, dtype=args.dtype, device=device, backend=args.backend, engine=args.engine,
                    check_weights=not args.no_weight_check, **hub_kwargs(args))
    config = lm.config
    target = modes.parse(args.target, config)
    if not isinstance(target, mexit.DecodeConfig):
        raise ValueError(f"--target {args.target}: speculative decoding verifies a fixed mode (original, exit:L, "
                         "acd:UPPER,LOWER)")
    exits = args.draft_exits or [e for e in config.exit_layers if e < target.depth(config)]
    settings = [SpeculativeConfig(e, k, None if str(t).lower() == "none" else number("--thresholds", t),
                                  draft_vocab=n or None)
                for e in exits for k in args.draft_lens for t in args.thresholds for n in args.draft_vocab]
    if len(set(settings)) < len(settings):
        raise ValueError("a (draft exit, draft length, threshold, draft vocabulary) setting is listed twice: list "
                         "each once")
    for s in settings:
        modes.build(lm.model, Speculation(s, target))  # checked: the exits, the checkpoint's token counts
    path = args.prompts or default_prompts(args.model)
    ids, encoding = encode(lm, read_prompts(path)[: args.n_prompts], args.max_new_tokens, path)
    meta = dict(run_metadata(lm.model.device, lm.model.dtype), model=str(args.model), encoding=encoding,
                n_prompts=len(ids), max_new_tokens=args.max_new_tokens, batch=args.batch, backend=lm.backend.name,
                engine=lm.engine, target=args.target)
    print(f"# full-depth reference: {len(ids)} prompts x {args.max_new_tokens} tokens, batch {args.batch}",
          file=sys.stderr, flush=True)
    run_all(lm, ids[: args.batch], 2, args.batch, mode=target)  # warm-up
    reference, _, _ = run_all(lm, ids, args.max_new_tokens, args.batch, mode=target)
    full_launches = launches_per_token(lm, ids[: args.batch], args.max_new_tokens, args.batch, mode=target)
    rows = []
    from tqdm import tqdm

    for spec in tqdm(settings, desc="speculative", disable=args.quiet):
        run_all(lm, ids[: args.batch], 2, args.batch, mode=target, speculative=spec)  # warm this path
        kept = {}

        def speculative(_p, _u, spec=spec, kept=kept) -> float:
            kept["tokens"], kept["results"], seconds = run_all(lm, ids, args.max_new_tokens, args.batch,
                                                               mode=target, speculative=spec)
            return seconds

        pairs = interleaved_pairs(lambda *_: run_all(lm, ids, args.max_new_tokens, args.batch, mode=target)[2],
                                  speculative, args.repeats)
        tokens, results = kept["tokens"], kept["results"]
        st = [r.stats for r in results]
        drafted, accepted = sum(s["drafted"] for s in st), sum(s["accepted"] for s in st)
        verifications = sum(s["verifications"] for s in st)
        spec_bytes = sum(s["weight_bytes_per_token"] * s["decoded_tokens_per_row"] for s in st)
        full_bytes = sum(s["full_depth_weight_bytes_per_token"] * s["decoded_tokens_per_row"] for s in st)
        rows.append(dict(
            meta, draft_exit=spec.draft_exit, draft_len=spec.draft_len, draft_threshold=spec.draft_threshold,
            draft_vocab=spec.draft_vocab,
            acceptance_rate=accepted / drafted if drafted else None,  # None: nothing was drafted
            tokens_per_verification=(accepted + verifications) / max(verifications, 1),
            weight_bytes_ratio=spec_bytes / full_bytes,
            launches_ratio=launches_per_token(lm, ids[: args.batch], args.max_new_tokens, args.batch,
                                              mode=target, speculative=spec) / full_launches,
            **speedup_interval(pairs),
            lossless=tokens == reference))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="multi-exit checkpoint folder or hub id")
    p.add_argument("--prompts", help="prompts file as --prompts-file takes it: text, one prompt per line, or JSON "
                   "lines (default: the model folder's prompts.txt, "
                   "else bench/prompts.txt)")
    p.add_argument("--n-prompts", type=int, default=10, help="prompts used (the first N)")
    p.add_argument("--draft-exits", type=int, nargs="+", help="default: every exit below the target's depth")
    p.add_argument("--draft-lens", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8], help="drafts per verification")
    p.add_argument("--thresholds", nargs="+", default=["none", "0.5"], help="draft confidence stop ('none': off)")
    p.add_argument("--target", default="original",
                   help="the fixed mode verified, as a mode string: original, exit:L or acd:UPPER,LOWER")
    p.add_argument("--draft-vocab", type=int, nargs="+", default=[0], metavar="N",
                   help="draft heads restricted to the N most frequent tokens (the checkpoint's "
                   "token_counts.safetensors; 0: the full head)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--batch", type=int, default=1, help="prompts per generate call")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved (full depth, setting) timing pairs (>= 2 for an interval)")
    add_load_args(p)
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else 1 on CPU)")
    p.add_argument("--out", default="speculative_results", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main_args(args) -> int:
    if args.repeats < 2 or args.batch < 1 or args.n_prompts < 1 or args.max_new_tokens < 2:
        raise ValueError("--batch and --n-prompts must be >= 1, --max-new-tokens >= 2, --repeats >= 2 (an interval "
                         "needs two pairs)")
    from mexit.frontends.output import check_output_folder

    check_output_folder(args.out)
    rows = sweep(args)
    out = Path(args.out)
    write_results(rows, out, "speculative")
    with open(out / "speculative.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, COLUMNS)
    r0 = rows[0]
    (out / "speculative.md").write_text(f"{r0['model']} | target {r0['target']} | {r0['device']} | {r0['dtype']} | "
                                        f"{r0['n_prompts']} prompts x {r0['max_new_tokens']} tokens, batch "
                                        f"{r0['batch']}\n\n{table}\n")
    print(table)
    return 0


def add_parser(sub) -> None:
    add_subcommand(sub, "bench-speculative", "self-speculative decoding sweep: acceptance, exact cost, speed-up",
                   add_arguments, main_args)


def main(argv=None) -> int:
    return script_main(__doc__, add_arguments, main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
