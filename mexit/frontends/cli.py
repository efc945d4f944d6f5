"""Command line: `mexit generate`, `mexit layers`, `mexit eval`, `mexit train-heads`, `mexit train-exit-predictors`,
`mexit count-tokens`, `mexit convert`, `mexit bench`, `mexit ablate`, `mexit bench-speculative`.

A user error (bad flag, bad checkpoint, bad value) prints one `error: ...` line and exits 2; an internal error
keeps its traceback and exits 1."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import warnings
from pathlib import Path

from mexit.decoding import modes
from mexit.timing import interleaved_pairs, ratio_interval

from .output import HelpFormatter


class UsageError(ValueError):
    """A flag combination mexit refuses."""


class Once(argparse.Action):
    """A flag that may be given once: a second value is an error, not a silent replacement of the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} was given twice (this command reads one prompt)")
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """argparse with one `error:` line (and exit code 2) instead of the usage block, and no abbreviated flags (a
    prefix would silently stand for another flag: `--mode` for `--model` where a command has no `--mode`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)




def parse_ints(text: str) -> list[int]:
    """Comma-separated integers; an empty item ("2,,4", a trailing comma) is an error, not skipped."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_exits(text: str) -> list[int] | None:
    """--exits: comma-separated layers, or "all" (None: every exit, as a mode string's `all`)."""
    return None if text == "all" else parse_ints(text)


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


def parse_mode_word(text: str) -> str:
    """--mode: a mode's name, or a string of the mode mini-language (`mexit.decoding.modes`: exit:12, acd:24,12,
    ee:max-prob:0.9, ...), checked for its kind here and for its values once the checkpoint is known."""
    kind = text.partition(":")[0]
    if text in modes.NAMES or (":" in text and kind in modes.NAMES + modes.SHORT_NAMES):
        return text
    raise argparse.ArgumentTypeError(f"unknown mode {text!r}: use one of {', '.join(modes.NAMES)}, or a mode string "
                                     "such as exit:12, acd:24,12, ee:max-prob:0.9 (mexit.decoding.modes)")


def parse_dola_layers(text: str):
    if text in ("low", "high"):
        return text
    try:
        return parse_ints(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--dola-layers takes low, high or L1,L2,..., got {text!r}") from None


def add_hub_args(p: argparse.ArgumentParser) -> None:
    """huggingface_hub's loading arguments (`mexit.model.checkpoint.HubOptions`)."""
    p.add_argument("--revision", help="hub id: the branch, tag or commit to load (default: main)")
    p.add_argument("--subfolder", default="", help="where in the folder or hub repository the checkpoint lies")
    p.add_argument("--cache-dir", help="hub id: the hub cache folder (default: huggingface_hub's, HF_HOME)")
    p.add_argument("--local-files-only", action="store_true", help="hub id: use the hub cache, never the network")
    p.add_argument("--token", help="hub id: an access token for gated or private repositories (default: HF_TOKEN or "
                   "`hf auth login`)")


def hub_kwargs(args) -> dict:
    return dict(revision=args.revision, token=args.token, cache_dir=args.cache_dir,
                local_files_only=args.local_files_only, subfolder=args.subfolder)


def add_load_args(p: argparse.ArgumentParser, decode: bool = True) -> None:
    """Where and how a model loads (huggingface_hub's options, device, dtype, the weight check); decode: also the
    backend and engine its decode steps run on. Every command that loads a model by --model takes these."""
    add_hub_args(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None,
                   help="fp32, fp16, bf16 or auto (the stored dtype) (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--no-weight-check", action="store_true",
                   help="load tensors holding NaN/inf instead of refusing them (outputs will be meaningless)")
    if decode:
        p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                       help="exit stage and decode blocks: Triton kernels or the PyTorch reference (auto: triton on "
                       "cuda)")
        p.add_argument("--engine", default="auto", choices=["auto", "eager", "static", "graph"],
                       help="decode loop: CUDA graphs, the same static step uncaptured, or eager (auto: graph on "
                       "cuda)")


def add_model_args(p: argparse.ArgumentParser, decode: bool = True) -> None:
    """The checkpoint and its loading options; decode: also how decode steps run (backend, engine, kernels), for
    commands that decode."""
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    add_load_args(p, decode)
    if not decode:
        p.set_defaults(backend="auto", engine="auto", compile=False, pdl=None, gemv_max_rows=None,
                       fused_max_rows=None)
        return
    p.add_argument("--compile", action="store_true", help="torch.compile the static step's layers (static/graph)")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                   help="programmatic dependent launch between the decode step's kernels (triton backend, static/"
                   "graph engine, Hopper or newer; default: the card's measured setting, mexit/ops/routes.json)")
    p.add_argument("--gemv-max-rows", type=int, default=None,
                   help="triton: decode batches up to this size (<= 8) run the loop-free GEMV block linears "
                   "(default: the card's measured choice; 0 on every card measured so far)")
    p.add_argument("--fused-max-rows", type=int, default=None,
                   help="triton: decode batches up to this size run the tiled fused-linear kernels, larger ones "
                   "cuBLAS (default: the card's measured choice on CUDA)")


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text or tokens", formatter_class=HelpFormatter)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--input-ids", action="append", type=parse_ints, help="comma-separated token ids (repeatable)")
    src.add_argument("--prompts-file", help="a data set: one prompt per line exactly as written (empty lines skipped), "
                     "or JSON lines (a .jsonl name, or every line an object) with \"prompt\" or \"input_ids\" (and "
                     "an optional \"id\"); every prompt is checked before the first batch; needs --out")
    p.add_argument("--out", help="--prompts-file: JSONL written in input order, one line per prompt (a rerun resumes "
                   "under the same settings, recorded in OUT.settings.json)")
    p.add_argument("--skip-bad-prompts", action="store_true",
                   help="--prompts-file: write a prompt that cannot run (empty, too long, bad ids) as a row with "
                   "\"error\" and go on, instead of refusing the file by line number")
    p.add_argument("--batch", type=int, default=None, help="--prompts-file: prompts per generate call (default 8)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="--prompts-file on a Ray cluster (Ray Data): one model per GPU (per --threads CPUs without "
                        "GPUs), the same output file as one machine writes; 'auto' (the default with --ray): the "
                        "cluster this machine runs or a new local one; else a cluster address")
    p.add_argument("--threads", type=int, help="CPU threads of torch (with --ray and no GPUs: per worker; default 1 "
                   "there, torch's default here)")
    p.add_argument("--mode", default="original", type=parse_mode_word,
                   metavar="{" + ",".join(modes.NAMES) + "}|MODE-STRING",
                   help="original head, one exit (--exit-layer), ACD (--contrast), DoLa (--dola-layers), "
                        "confidence-gated early exit, or self-speculative decoding of the original head (or of "
                        "--exit-layer / --contrast); or a mode string with its settings, as `mexit bench --modes` "
                        "takes it: exit:12, acd:24,12, ee:max-prob:0.9:8,12, dola:high, spec:12:2")
    p.add_argument("--exit-layer", type=int, help="--mode exit: the exit layer that produces the tokens")
    p.add_argument("--contrast", type=parse_contrast, help="--mode contrast: UPPER,LOWER; UPPER may be 'original'")
    p.add_argument("--dola-layers", type=parse_dola_layers,
                   help="--mode dola: candidate premature layers: low, high or L1,L2,... (transformers' rules)")
    p.add_argument("--repetition-penalty", type=float,
                   help="transformers' repetition penalty on the mode's scores (1: off; every mode; "
                        "default: the checkpoint's generation_config.json, else 1)")
    p.add_argument("--no-repeat-ngram-size", type=int,
                   help="never repeat an n-gram of this size (transformers'; 0: off; every mode)")
    p.add_argument("--dola-heads", choices=["embedding", "exit"],
                   help="--mode dola: premature logits from the output embedding on raw block outputs "
                        "(transformers; the default), or from the checkpoint's exit heads")
    sp = p.add_argument_group("self-speculative decoding (--mode speculative): the target mode's exact output")
    sp.add_argument("--draft-exit", type=int, help="exit layer whose head drafts (required)")
    sp.add_argument("--draft-len", type=int, help="drafts per verification at most (default: 1)")
    sp.add_argument("--draft-vocab", type=int,
                    help="draft from the N most frequent tokens only (the checkpoint's token_counts.safetensors; "
                         "the output stays exact; 0: the whole head, the default)")
    sp.add_argument("--draft-threshold", type=float,
                    help="stop drafting at a draft whose top probability is below this (default: never)")
    p.add_argument("--alpha", type=float, help="ACD plausibility threshold (share of the top prob; default: 0.1)")
    p.add_argument("--min-candidates", type=int,
                   help="ACD: tokens always kept in the plausible set (default: 1)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per prompt at most (default: the checkpoint's generation_config.json, else "
                        "32)")
    p.add_argument("--do-sample", action="store_true", default=None,
                   help="sample instead of greedy decoding (default: the checkpoint's generation_config.json, else "
                        "greedy)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: generation_config.json, else 1.0)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely (default: generation_config.json, else 0: off)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass (default: generation_config.json, else 1.0: off)")
    p.add_argument("--seed", type=int,
                   help="seed of the sampler, each row its own stream (default: drawn, and printed)")
    p.add_argument("--no-eos", action="store_true", help="never stop at the end-of-text token")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (one prompt)")
    ee = p.add_argument_group("early exit (--mode early-exit)")
    ee.add_argument("--threshold", type=float, help="confidence needed to exit (required)")
    ee.add_argument("--measure", choices=["max-prob", "margin", "cosine", "learned"],
                    help="confidence: top-1 probability (the default), top-1 minus top-2, cosine of consecutive "
                         "exits' states, or the checkpoint's learned exit predictors (mexit train-exit-predictors)")
    ee.add_argument("--exits", type=parse_exits, help="checked exit layers, e.g. 8,12,16, or all (the default)")
    ee.add_argument("--min-layer", type=int, help="no exit below this layer (default: 1)")
    ee.add_argument("--decay-tau", type=float, help="CALM's decaying threshold with this tau (off by default)")
    ee.add_argument("--final-head", type=parse_head, help="the head of tokens that never exit: original (the "
                    "default) or an exit layer, which then sets the depth (learned predictors trained with "
                    "--final-head L need the same)")
    ee.add_argument("--propagation", choices=["eager", "deferred"],
                    help="skipped layers' keys/values computed at the exit (eager, the default), or with the next "
                         "deep token")
    ee.add_argument("--schedule", choices=["segments", "predicated"],
                    help="static / graph engines: a CUDA graph per segment between checks (one flag read each; the "
                         "default), or the whole step one graph with kernels that skip past the exit (needs the "
                         "triton backend)")
    ee.add_argument("--time-full-depth", action="store_true",
                    help="also time full depth on the same prompts (a data set: its first batch), interleaved with "
                         "this setting (3 pairs after one untimed call), and report the decode time ratio: the "
                         "weight-byte ratio does not predict time")
    p.add_argument("--json", action="store_true", help="print one strict JSON object (with timings)")
    p.set_defaults(run=run_generate)


def check_generate_flags(args) -> None:
    """Conflicting flags are errors; flags that would be ignored are warnings. The mode's settings come from the
    registry (`modes.from_flags`: its flags, or a --mode string and the flags it leaves open) into `args.settings`;
    `args.mode` becomes the mode's name."""
    given = {flag: getattr(args, flag, None) for flag in modes.FLAGS}  # a mode's flag this parser lacks: its string
    args.mode_as_given = args.mode
    args.mode, args.settings = modes.from_flags(args.mode, given)
    if args.time_full_depth and args.mode != "early-exit":
        raise UsageError(f"--time-full-depth applies to --mode early-exit, not --mode {args.mode}")
    if args.stream and args.json:
        raise UsageError("--stream and --json are exclusive (JSON is printed once at the end)")
    if args.time_full_depth and (args.stream or args.ray):
        raise UsageError("--time-full-depth times this machine's generate calls: not with --stream or --ray")
    if args.prompts_file and not args.out:
        raise UsageError("--prompts-file needs --out (the JSONL the results go to)")
    if args.out and not args.prompts_file:
        raise UsageError("--out goes with --prompts-file (use --json to print one prompt batch's results)")
    if args.prompts_file and (args.stream or args.json):
        raise UsageError("--prompts-file writes its results to --out: --stream and --json do not apply")
    if args.ray and not args.prompts_file:
        raise UsageError("--ray goes with --prompts-file (a data set spread over a cluster)")
    if args.skip_bad_prompts and not args.prompts_file:
        raise UsageError("--skip-bad-prompts goes with --prompts-file")
    if args.batch is not None and not args.prompts_file:
        raise UsageError("--batch goes with --prompts-file (the --prompt / --input-ids prompts run as one batch)")
    args.batch = 8 if args.batch is None else args.batch
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.stream and len(args.prompt or args.input_ids or []) != 1:
        raise UsageError("--stream prints the text of one prompt: pass exactly one")


def add_train_heads_parser(sub) -> None:
    p = sub.add_parser("train-heads", help="train linear exit heads on a frozen GPT-2 (writes a multi-exit checkpoint)",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="base checkpoint folder (plain or multi-exit GPT-2, with tokenizer)")
    p.add_argument("--data", nargs="+", required=True, help="training text files")
    p.add_argument("--eval-data", nargs="+", help="held-out text files (default: the last --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, help="share of --data held out without --eval-data (default 0.05)")
    p.add_argument("--exits", type=parse_ints, required=True, help="exit layers to train, e.g. 2,4,6")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per training sequence (default: 512, or the model's context if shorter)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=float, help="passes over the data (default: 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate (linear schedule)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--init", default="embedding", choices=["embedding", "zero"],
                   help="heads start as a copy of the model's own output head, or at zero")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the frozen base in bf16 and the heads under bf16 autocast (fp32 master weights)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: start and end)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--eval-max-blocks", type=int, default=256, help="held-out sequences evaluated at most")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--resume", action="store_true",
                   help="continue the training saved in --out (a longer --steps / --epochs extends it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(run=run_train_heads)


def held_out_fraction(args) -> dict:
    """--eval-fraction as the trainers' setting (left out: their default); refused beside --eval-data, which
    replaces the held-out share."""
    if args.eval_fraction is None:
        return {}
    if args.eval_data:
        raise ValueError("--eval-fraction holds out a share of --data; with --eval-data nothing is held out from it: "
                         "give one of the two")
    return {"eval_fraction": args.eval_fraction}


def run_train_heads(args) -> int:
    from mexit.training.common import TrainingInterrupted
    from mexit.training.heads import HeadTrainingConfig, train_heads

    cfg = HeadTrainingConfig(
        model=args.model, data=args.data, out=args.out, exits=tuple(args.exits), eval_data=args.eval_data,
        **held_out_fraction(args), seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
        epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        init=args.init, device=args.device, dtype=args.dtype, eval_every=args.eval_every,
        save_every=args.save_every, eval_max_blocks=args.eval_max_blocks, resume=args.resume,
        overwrite=args.overwrite, seed=args.seed)
    try:
        report = train_heads(cfg)
    except TrainingInterrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return 130
    from mexit.training.heads import report_markdown

    print(report_markdown(report))
    print(f"wrote {args.out}")
    return 0


def add_train_predictors_parser(sub) -> None:
    p = sub.add_parser("train-exit-predictors", formatter_class=HelpFormatter,
                       help="learn per-exit predictors of agreement with the final head (--measure learned)",
                       description="Per checked exit, a logistic probe on the standardized hidden state (d + 1 "
                                   "weights) learns whether the exit's top-1 token equals the final head's (CALM's "
                                   "consistency oracle), base and heads frozen. Writes exit_predictors.safetensors "
                                   "and exit_predictors_report.{json,md} into the checkpoint folder.")
    p.add_argument("--model", required=True, help="local multi-exit checkpoint folder (the predictors go into it)")
    p.add_argument("--data", nargs="+", required=True, help="training text files")
    p.add_argument("--eval-data", nargs="+", help="held-out text files (default: the last --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, help="share of --data held out without --eval-data (default 0.1)")
    p.add_argument("--exits", type=parse_ints, help="exits to learn (default: every exit below the final head)")
    p.add_argument("--final-head", default="original", type=parse_head,
                   help="the head whose tokens the labels compare with: original or an exit layer")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: 256, or the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: two epochs)")
    length.add_argument("--epochs", type=float, help="passes over the data (default: 2)")
    p.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate (linear schedule)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--save-every", type=int, default=0, help="save the training state every N steps (0: at the end)")
    p.add_argument("--eval-max-blocks", type=int, default=256, help="held-out sequences evaluated at most")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--resume", action="store_true", help="continue the training saved in the folder")
    p.add_argument("--overwrite", action="store_true", help="replace the folder's existing predictors")
    p.set_defaults(run=run_train_predictors)


def add_count_tokens_parser(sub) -> None:
    p = sub.add_parser("count-tokens", formatter_class=HelpFormatter,
                       help="count token frequencies of a text into the checkpoint (for --draft-vocab)",
                       description="Tokenizes the text files with the checkpoint's tokenizer and writes how often each "
                                   "token occurs as token_counts.safetensors into the checkpoint folder: the "
                                   "frequency ranking that --draft-vocab N restricts draft heads to.")
    p.add_argument("--model", required=True, help="local checkpoint folder (the counts go into it)")
    p.add_argument("--data", nargs="+", required=True, help="text files")
    p.add_argument("--overwrite", action="store_true", help="replace the folder's existing counts")
    p.set_defaults(run=run_count_tokens)


def run_count_tokens(args) -> int:
    from mexit.training.common import write_token_counts

    counts, path = write_token_counts(Path(args.model), args.data, overwrite=args.overwrite)
    top = counts.sort(descending=True).values
    share = {n: float(top[:n].sum() / max(int(counts.sum()), 1)) for n in (256, 1024, 4096) if n < len(counts)}
    seen = int((counts > 0).sum())
    print(f"{int(counts.sum())} tokens, {seen} of {len(counts)} ids seen; the most frequent "
          + ", ".join(f"{n} cover {v:.1%}" for n, v in share.items())
          + (f" (a draft vocabulary larger than {seen} also holds ids this text never used, in no meaningful order: "
             "count more text)" if any(n > seen for n in share) else ""))
    print(f"wrote {path}")
    return 0


def parse_head(text: str):
    """--final-head: original or an exit layer."""
    if text == "original":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected original or an exit layer, got {text!r}") from None


def run_train_predictors(args) -> int:
    from mexit.training.common import TrainingInterrupted
    from mexit.training.predictors import PredictorTrainingConfig, report_markdown, train_exit_predictors

    cfg = PredictorTrainingConfig(
        model=args.model, data=args.data, exits=tuple(args.exits) if args.exits else None, final_head=args.final_head,
        eval_data=args.eval_data, **held_out_fraction(args), seq_len=args.seq_len, batch_size=args.batch_size,
        steps=args.steps, epochs=args.epochs, lr=args.lr, device=args.device, save_every=args.save_every,
        eval_max_blocks=args.eval_max_blocks, resume=args.resume, overwrite=args.overwrite, seed=args.seed)
    try:
        report = train_exit_predictors(cfg)
    except TrainingInterrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return 130
    print(report_markdown(report))
    print(f"wrote {Path(args.model) / 'exit_predictors.safetensors'}")
    return 0


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint as safetensors in a chosen dtype (loads faster, smaller)",
                       formatter_class=HelpFormatter,
                       description="Reads any layout mexit loads (pytorch_model.bin, sharded .bin, safetensors) and "
                                   "writes safetensors (sharded with an index above --shard-size), config.json with "
                                   "the source's fields, generation_config.json and the tokenizer files. The output "
                                   "loads in mexit and in transformers' GPT2LMHeadModel.")
    p.add_argument("src", help="checkpoint folder or hub id")
    p.add_argument("out", help="output folder (new, or holding no weights)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="stored dtype (default: the source's)")
    p.add_argument("--shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB")
    p.add_argument("--no-weight-check", action="store_true", help="skip the NaN / inf / range check of the tensors")
    add_hub_args(p)
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from mexit.model.checkpoint import HubOptions
    from mexit.model.files import weight_files
    from mexit.model.save import convert

    out = convert(args.src, args.out, dtype=args.dtype, max_shard_size=args.shard_size,
                  check_weights=not args.no_weight_check, hub=HubOptions(**hub_kwargs(args)))
    files = weight_files(out)
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {out}: {len(files)} safetensors file(s), "
          f"{f'{size / 1e9:.2f} GB' if size >= 1e8 else f'{size / 1e6:.2f} MB'}")
    return 0


def check_schedule(schedule: str, engine: str, what: str) -> None:
    """An early-exit schedule other than segments runs on the static / graph engines only (UsageError naming
    `what`, the flag or mode that asked for it)."""
    if schedule != "segments" and engine == "eager":
        raise UsageError(f"{what} is a static-engine schedule: use --engine static or graph (the eager engine runs "
                         "the reference scheduler)")


def run_generate_on_ray(args) -> int:
    from mexit.frontends.api import MultiExitLM
    from mexit.frontends.cluster import absolute, generate_file_on_ray

    load_kw = dict(path_or_id=absolute(args.model), dtype=args.dtype, device=args.device, backend=args.backend,
                   engine=args.engine, compile=args.compile, check_weights=not args.no_weight_check, pdl=args.pdl,
                   fused_max_rows=args.fused_max_rows, gemv_max_rows=args.gemv_max_rows, **hub_kwargs(args))
    with interrupt_message():
        summary = generate_file_on_ray(MultiExitLM.from_pretrained, load_kw, args.prompts_file, args.out, args.batch,
                                       seed=args.seed, address=args.ray, threads=args.threads or 1,
                                       skip_bad=args.skip_bad_prompts, **generate_kwargs(args))
    print(file_summary(args.out, summary, written_rows(args.out)) + " on Ray")
    return 0


def exit_summary(exit_layers: list[list[int]], stats: dict) -> dict:
    """What early exit saved in one call: the weight-byte ratio against full depth, blocks and heads read per
    decode step (the batch's weight reads), the mean exit layer and how many tokens exited at each layer."""
    from mexit.decoding.stats import exit_histogram

    steps = max(stats.get("steps", 0), 1)
    return dict(weight_bytes_ratio=stats.get("weight_bytes_ratio"), mean_exit_layer=stats.get("mean_exit_layer"),
                depth=stats.get("depth"), blocks_read_per_step=stats.get("weight_blocks", 0) / steps,
                heads_read_per_step=stats.get("weight_heads", 0) / steps,
                exit_histogram=exit_histogram(exit_layers))


def full_depth_time_ratio(lm, prompts, kw: dict, seed, passes: int = 3) -> dict:
    """The early-exit setting's decode time per token against full depth's (the original head) on `prompts`: one
    untimed call of full depth (the setting has run), then `passes` pairs timed in alternating order on the device
    clock (`Timer`: the steps after the first token; `mexit.timing.interleaved_pairs`). time_ratio (< 1: faster): the
    geometric mean of the pairs' ratios with its 95% interval (`mexit.timing.ratio_interval`, as `mexit ablate`
    reports speed-ups)."""
    full_kw = {k: v for k, v in kw.items() if k != "mode"}

    def per_token(settings: dict) -> float:
        timer = Timer(lm.model.device)
        timer.begin()
        out = lm.generate(prompts, seed=seed, on_token=timer.on_token, **settings)
        ms = timer.report(len(out.tokens))["ms_per_token"]
        if ms is None:
            raise UsageError("--time-full-depth needs at least 2 new tokens per row to time decode steps")
        return ms

    per_token(full_kw)
    pairs = interleaved_pairs(lambda *_: per_token(full_kw), lambda *_: per_token(kw), passes)
    ratio, low, high = ratio_interval([math.log(ee / full) for full, ee in pairs])
    return dict(time_ratio=ratio, time_ratio_lo=low, time_ratio_hi=high,
                full_depth_ms_per_token=statistics.median(full for full, _ in pairs),
                ms_per_token=statistics.median(ee for _, ee in pairs), timed_pairs=passes)


def time_note(t: dict) -> str:
    return (f"decode time {t['time_ratio']:.2f}x full depth's ([{t['time_ratio_lo']:.2f}, {t['time_ratio_hi']:.2f}] "
            f"95%, {t['timed_pairs']} interleaved pairs; {t['ms_per_token']:.3f} vs "
            f"{t['full_depth_ms_per_token']:.3f} ms/token)")


def written_rows(out) -> list[dict]:
    """The rows of a finished data-set run's output file."""
    return [json.loads(text) for text in Path(out).read_text().splitlines()] if Path(out).exists() else []


def file_summary(out, summary: dict, rows: list[dict]) -> str:
    """What a data-set run wrote (rows: the file's, `written_rows`); with early exit, the file's exit layers (mean
    and histogram over its tokens), with DoLa its premature layers."""
    seed = f", seed {summary['seed']} + row index" if summary["seed"] is not None else ""
    bad = f", {summary['bad']} bad prompt(s) written as errors" if summary["bad"] else ""
    line = f"wrote {out}: {summary['written']} prompts ({summary['skipped']} already there{bad}{seed})"
    from mexit.decoding.stats import exit_histogram

    layers = [x for row in rows for x in row.get("exit_layers", [])]
    if layers:
        line += (f"\n# early exit over the file: mean exit layer {sum(layers) / len(layers):.2f}; tokens per exit "
                 f"layer {exit_histogram([layers])}")
    premature = [x for row in rows for x in row.get("premature_layers", [])]
    if premature:
        line += f"\n# DoLa over the file: tokens per premature layer {exit_histogram([premature])}"
    return line


@contextlib.contextmanager
def interrupt_message():
    """Ctrl-C in a data-set run: one line saying what was saved and how to resume, exit code 130."""
    from mexit.frontends.datasets import Interrupted

    try:
        yield
    except Interrupted as stop:
        print(f"error: {stop}", file=sys.stderr)
        raise SystemExit(130) from None


def load_lm(args):
    from mexit.frontends.api import MultiExitLM

    lm = MultiExitLM.from_pretrained(args.model, dtype=args.dtype, device=args.device, backend=args.backend,
                                     engine=args.engine, compile=args.compile,
                                     check_weights=not args.no_weight_check, pdl=args.pdl,
                                     fused_max_rows=args.fused_max_rows, gemv_max_rows=args.gemv_max_rows,
                                     **hub_kwargs(args))
    return lm


class Timer:
    """One generate call split at its first token (prefill + first head) and the rest (decode), on the device
    clock (`mexit.timing.DeviceClock`: CUDA events on a GPU, so only the device's own time; perf_counter on CPU)."""

    def __init__(self, device, stream_to=None, tokenizer=None):
        from mexit.timing import DeviceClock

        self.clock = DeviceClock(device)
        self.stream_to, self.tokenizer = stream_to, tokenizer
        self.start = self.first = None
        self.steps = 0
        self.printed = ""
        self.ids: list[int] = []

    def begin(self):
        self.start = self.clock.mark()

    def on_token(self, tokens):
        if self.first is None:
            self.first = self.clock.mark()
        self.steps += 1
        if self.stream_to is not None:
            self.ids.append(int(tokens[0]))
            self.write_stream(final=False)

    def write_stream(self, final: bool) -> None:
        """Print the text decoded so far past what is printed (held back while a character is incomplete)."""
        text = self.tokenizer.decode(self.ids) if self.tokenizer is not None else ",".join(map(str, self.ids))
        if final or not text.endswith("\ufffd"):
            self.stream_to.write(text[len(self.printed):] + ("\n" if final else ""))
            self.stream_to.flush()
            self.printed = text

    def report(self, rows: int) -> dict:
        end = self.clock.mark()
        decode_s = self.clock.ms(self.first, end) / 1e3 if self.first is not None else 0.0
        decode_steps = max(0, self.steps - 1)
        return {"prefill_ms": round(self.clock.ms(self.start, self.first), 3) if self.first else None,
                "ms_per_token": round(decode_s * 1e3 / decode_steps, 3) if decode_steps else None,
                "tokens_per_s": round(rows * decode_steps / decode_s, 2) if decode_steps and decode_s > 0 else None,
                "timing": "device clock of this call (CUDA events on a GPU; first use includes kernel compilation / "
                          "graph capture); "
                          "prefill_ms: prompt + first token; ms_per_token and tokens_per_s: later steps, all rows"}


def strict_json(value):
    """NaN / inf (never valid JSON) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def generate_kwargs(args) -> dict:
    """`generate` keyword arguments of the mode, lengths and sampling flags (not the prompts, seed or callback)."""
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
              no_repeat_ngram_size=args.no_repeat_ngram_size)
    if args.no_eos:
        kw["eos_token_id"] = None
    return dict(kw, mode=args.settings)


def run_generate(args) -> int:
    check_generate_flags(args)
    if args.ray:
        return run_generate_on_ray(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    lm = load_lm(args)
    schedule = getattr(args.settings, "schedule", "segments")  # early exit's
    given = args.mode_as_given
    check_schedule(schedule, lm.engine, f"--mode {given}: the {schedule} schedule" if ":" in given else
                   f"--schedule {schedule}")
    prompts = args.prompt if args.prompt else args.input_ids
    timer = Timer(lm.model.device, sys.stdout if args.stream else None, lm.tokenizer)
    unsampled = [f"--{n.replace('_', '-')}" for n in ("temperature", "top_k", "top_p", "seed")
                 if getattr(args, n) is not None]
    if unsampled and not (args.do_sample or lm.defaults.get("do_sample")):
        warnings.warn(f"{', '.join(unsampled)} unused: greedy decoding (add --do-sample to sample)", stacklevel=2)
        args.temperature = args.top_k = args.top_p = args.seed = None  # said once, here, by flag
    kw = generate_kwargs(args)
    if args.prompts_file:
        from mexit.frontends.datasets import generate_file

        with interrupt_message():
            summary = generate_file(lm, args.prompts_file, args.out, args.batch, seed=args.seed,
                                    skip_bad=args.skip_bad_prompts, **kw)
        rows = written_rows(args.out)
        print(file_summary(args.out, summary, rows))
        if args.time_full_depth:
            from mexit.frontends.datasets import read_prompt_file

            bad = {row["index"] for row in rows if "error" in row}
            first = [r["prompt"] if "prompt" in r else r["input_ids"] for r in
                     read_prompt_file(args.prompts_file) if r["index"] not in bad][: args.batch]
            print(f"# early exit against full depth (the file's first batch of good prompts): "
                  f"{time_note(full_depth_time_ratio(lm, first, kw, args.seed))}")
        return 0
    timer.begin()
    result = lm.generate(prompts, seed=args.seed, on_token=timer.on_token, **kw)
    timing = timer.report(len(result.tokens))
    against = full_depth_time_ratio(lm, prompts, kw, result.seed) if args.time_full_depth else None
    if args.stream:  # the text as it came; the seed and the summaries below still follow
        timer.write_stream(final=True)
    elif args.json:
        payload = {"tokens": result.tokens, "backend": result.backend, "engine": result.engine,
                   "random_weights": lm.is_random, **timing}
        if result.seed is not None:
            payload["seed"] = result.seed
        if result.nonfinite:  # {row: first token computed from a NaN / inf state} (also the warning on stderr)
            payload["nonfinite"] = {str(row): token for row, token in result.nonfinite.items()}
        if result.text is not None:
            payload["text"] = result.text
        stats = result.stats
        # against the full model (speculative: its target); null when no token was decoded after the prompt's
        payload["weight_bytes_ratio"] = stats.get("weight_bytes_ratio")
        if result.exit_layers is not None:
            payload["exit_layers"] = result.exit_layers
            payload["early_exit"] = dict(exit_summary(result.exit_layers, stats), **(against or dict(
                time_ratio=None, time_note="not measured: add --time-full-depth")))
            payload["confidences"] = result.confidences
            payload["confidences_note"] = (
                f"confidence ({args.settings.measure}) measured at the exit that fired; null where it is undefined. "
                f"Tokens "
                f"that never exited ran to layer {lm.config.n_layer} and carry the final head's top-1 probability")
        if result.drafted is not None:
            payload["drafted"] = result.drafted
            payload["speculative"] = result.stats
        if result.premature_layers is not None:
            from mexit.decoding.stats import exit_histogram

            payload["premature_layers"] = result.premature_layers
            payload["dola"] = dict(premature_layer_histogram=exit_histogram(result.premature_layers))
        print(json.dumps(strict_json(payload), allow_nan=False))
        return 0
    if result.seed is not None and args.seed is None:
        print(f"# seed {result.seed} (pass --seed {result.seed} to repeat this run)", file=sys.stderr)
    for b, tokens in enumerate(result.tokens):
        if not args.stream:  # streamed (one prompt): the text is above
            if len(result.tokens) > 1:  # rows apart: a text may span lines
                print(f"# row {b}" + (f": {prompts[b]!r}" if isinstance(prompts[b], str) else ""))
            print(result.text[b] if result.text is not None else ",".join(map(str, tokens)))
        if result.exit_layers is not None:
            layers = result.exit_layers[b]
            print(f"# exit layers: {layers} (mean {sum(layers) / len(layers):.2f} of {lm.config.n_layer})")
        if result.premature_layers is not None:
            print(f"# DoLa premature layers: {result.premature_layers[b]}")
    if result.exit_layers is not None and result.stats.get("weight_bytes_ratio") is not None:
        print(f"# early exit: weight reads {result.stats['weight_bytes_ratio']:.2f}x of full depth (the byte ratio, "
              "not a time ratio: " + (f"{time_note(against)})" if against else "--time-full-depth or `mexit ablate` "
                                      "times both)"))
    if result.drafted is not None:
        st = result.stats
        rate = st["acceptance_rate"]
        acceptance = "n/a (nothing drafted)" if rate is None else f"{rate:.2f}"
        print(f"# speculative: acceptance {acceptance}, "
              f"{st['tokens_per_verification']:.2f} tokens per verification, weight reads "
              f"{st['weight_bytes_ratio']:.2f}x of its target's (the verifying mode decoding alone)")
    return 0


def add_layers_parser(sub) -> None:
    p = sub.add_parser("layers", help="what every exit head and the original head predict at each position",
                       formatter_class=HelpFormatter,
                       description="One pass over the prompt: per position, each head's top-k tokens with their "
                                   "probabilities and its entropy. Prints heads x positions (top-1 and its "
                                   "probability), or JSON, and can draw a heatmap.")
    add_model_args(p, decode=False)  # one whole-sequence pass: no decode steps to configure
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action=Once, help="prompt text (one)")
    src.add_argument("--input-ids", action=Once, type=parse_ints, help="comma-separated token ids (one prompt)")
    p.add_argument("--top-k", type=int, default=5, help="tokens kept per head and position")
    p.add_argument("--json", action="store_true", help="print one strict-JSON object (shapes: heads x positions x k)")
    p.add_argument("--plot", help="write a PNG heatmap of heads x positions there")
    p.set_defaults(run=run_layers)


def run_layers(args) -> int:
    from mexit.frontends.lens import plot, table

    lm = load_lm(args)
    pred = lm.layer_predictions(args.prompt if args.prompt is not None else args.input_ids, args.top_k)[0]
    decode = lm.tokenizer.decode if lm.tokenizer is not None else (lambda ids: ",".join(map(str, ids)))
    if args.plot:
        plot(pred, decode, Path(args.plot), title=f"{Path(str(args.model)).name}: top-1 prediction of each head"
             + (" (RANDOM weights)" if lm.is_random else ""))
    if args.json:
        print(json.dumps(dict(pred.to_dict(decode), random_weights=lm.is_random), allow_nan=False))
    else:
        print(table(pred, decode))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def main(argv=None, commands=()) -> int:
    """Run `mexit ARGV` (ARGV None: sys.argv[1:]); returns the exit code. commands: more subcommands, each a
    function add_parser(subparsers) that registers one with `run` as its default (the hook through which
    `mexit.__main__` adds the benchmark commands of `mexit.bench`, which build on the front ends)."""
    from mexit.version import version_line

    parser = Parser(prog="mexit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_generate_parser(sub)
    add_train_heads_parser(sub)
    add_train_predictors_parser(sub)
    add_count_tokens_parser(sub)
    add_convert_parser(sub)
    add_layers_parser(sub)
    sub.add_parser("eval", add_help=False, help="lm-evaluation-harness on mexit: lm-eval's `run` arguments with "
                   "--model mexit implied (mode in --model_args; needs mexit[eval]; `mexit eval --help`)").set_defaults(
        run=lambda _args: print("error: `mexit eval` runs from the mexit command (mexit.__main__)", file=sys.stderr)
        or 2)
    for add_parser in commands:
        add_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (2, its line already printed)
        return int(done.code or 0)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *_a, **_k: print(f"warning: {message}", file=sys.stderr)
        try:
            return args.run(args)
        except (ValueError, OSError, NotImplementedError) as err:  # OSError: missing files, a full disk...
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2

