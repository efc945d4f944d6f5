"""Command line: `mexit generate`, `mexit bench`, `mexit ablate`."""

from __future__ import annotations

import argparse
import json
import sys


def parse_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_contrast(text: str) -> tuple:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--contrast takes UPPER,LOWER, got {text!r}")
    try:
        upper = parts[0] if parts[0] == "original" else int(parts[0])
        return upper, int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--contrast takes UPPER,LOWER (UPPER may be 'original'), got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder or hub id")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="exit stage: Triton kernels or the PyTorch reference (auto: triton on cuda)")
    p.add_argument("--engine", default="auto", choices=["auto", "eager", "static", "graph"],
                   help="decode loop: CUDA graphs, the same static step uncaptured, or eager (auto: graph on cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile the static step's layers (static/graph)")


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text or tokens")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--input-ids", action="append", type=parse_ints, help="comma-separated token ids (repeatable)")
    p.add_argument("--mode", default="original", choices=["original", "exit", "contrast", "early-exit"])
    p.add_argument("--exit-layer", type=int)
    p.add_argument("--contrast", type=parse_contrast, help="UPPER,LOWER; UPPER may be 'original'")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--min-candidates", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-eos", action="store_true", help="never stop at the end-of-text token")
    ee = p.add_argument_group("early exit (--mode early-exit)")
    ee.add_argument("--threshold", type=float, help="confidence needed to exit")
    ee.add_argument("--measure", default="max-prob", choices=["max-prob", "margin", "cosine"])
    ee.add_argument("--exits", type=parse_ints, help="checked exit layers, e.g. 8,12,16 (default: all)")
    ee.add_argument("--min-layer", type=int, default=1)
    ee.add_argument("--decay-tau", type=float, help="CALM's decaying threshold with this tau (off by default)")
    ee.add_argument("--propagation", default="eager", choices=["eager", "deferred"])
    ee.add_argument("--schedule", default="segments", choices=["segments", "predicated"],
                    help="fast path: a CUDA graph per segment between checks (one flag read each), or the whole "
                         "step one graph with kernels that skip past the exit (needs the triton backend)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_generate)


def load_lm(args):
    import mexit
    from mexit.checkpoint import resolve_device

    device = resolve_device(args.device)
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if not args.model:
        raise SystemExit("error: --model is required (a checkpoint folder or hub id)")
    return mexit.load(args.model, dtype=dtype, device=device, backend=args.backend, engine=args.engine,
                      compile=args.compile)


def run_generate(args) -> int:
    lm = load_lm(args)
    prompts = args.prompt if args.prompt else args.input_ids
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.no_eos:
        common["eos_token_id"] = None
    if args.mode == "early-exit":
        from mexit.early_exit import ExitPolicy

        if args.threshold is None:
            raise SystemExit("error: --mode early-exit needs --threshold")
        policy = ExitPolicy(threshold=args.threshold, measure=args.measure,
                            exits=tuple(args.exits) if args.exits else None, min_layer=args.min_layer,
                            decay_tau=args.decay_tau, max_steps=args.max_new_tokens, propagation=args.propagation,
                            schedule=args.schedule)
        result = lm.generate(prompts, early_exit=policy, **common)
    else:
        result = lm.generate(prompts, mode=args.mode, exit_layer=args.exit_layer, contrast=args.contrast,
                             alpha=args.alpha, min_candidates=args.min_candidates, **common)
    if args.json:
        payload = {"tokens": result.tokens, "backend": result.backend, "engine": result.engine}
        if result.text is not None:
            payload["text"] = result.text
        if result.exit_layers is not None:
            payload["exit_layers"] = result.exit_layers
            payload["confidences"] = result.confidences
        print(json.dumps(payload))
        return 0
    for b, tokens in enumerate(result.tokens):
        print(result.text[b] if result.text is not None else ",".join(map(str, tokens)))
        if result.exit_layers is not None:
            layers = result.exit_layers[b]
            print(f"# exit layers: {layers} (mean {sum(layers) / len(layers):.2f} of {lm.config.n_layer})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mexit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    from mexit.bench.ablate import add_parser as add_ablate_parser
    from mexit.bench.latency import add_parser as add_bench_parser

    add_bench_parser(sub)
    add_ablate_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
