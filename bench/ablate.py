"""Exit-threshold ablation: what each early-exit setting costs in quality and buys in speed.

    mexit ablate --model PATH [--prompts FILE] --thresholds 0.5 0.7 0.9 --measures max-prob cosine \\
                 --exit-sets all 8,12,16 --decay-tau none 4 --max-new-tokens 32 --out ablation

For every setting (threshold x measure x exit set x decay schedule) over the prompt file (default: the model
folder's prompts.txt when it ships one, else a small general set shipped with mexit): mean exit layer and the
histogram of exit layers; measured speed-up against full-depth generation (same prompts, engine and device, timed
end to end); token agreement with the full-depth greedy output; the full model's mean log-likelihood of the
generated continuation (a quality proxy); and the 4-gram repetition rate. The full-depth reference is a row of
its own, and the settings on the Pareto front of speed-up against log-likelihood (no other setting is both
faster and better) are marked and listed: those are worth using. Writes ablation.jsonl (resumable: finished
settings are not rerun), ablation.csv, and ablation.png (log-likelihood and agreement against speed-up). Every
setting is validated before any work starts."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
from pathlib import Path

from mexit.bench.common import (
    TRAFFIC,
    add_subcommand,
    markdown_table,
    pyplot,
    run_metadata,
    script_main,
    set_threads,
    spread_note,
)
from mexit.timing import DeviceClock
from mexit.values import read_text

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")


def default_prompts(model) -> Path:
    """The model folder's own prompts.txt (prompts in the model's domain), else mexit's general set."""
    own = Path(model) / "prompts.txt" if model else None
    return own if own is not None and own.is_file() else DEFAULT_PROMPTS


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one per line)")
    return prompts


def encode(lm, prompts: list[str]) -> tuple[list[list[int]], str]:
    """Tokenizer ids, or (no tokenizer: random-weight models) UTF-8 bytes modulo the vocabulary, labeled."""
    if lm.tokenizer is not None:
        return [lm.tokenizer.encode(p) for p in prompts], "tokenizer"
    return [[b % lm.config.vocab_size for b in p.encode()] for p in prompts], "utf-8 bytes (no tokenizer)"


def parse_exit_set(text: str, config) -> tuple[int, ...] | None:
    if text == "all":
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"exit set {text!r}: use 'all' or comma-separated layers like 8,12,16") from None


def settings(args, model) -> list[dict]:
    """Every (measure, threshold, exits, decay) setting, each validated as an ExitPolicy for this checkpoint (its
    learned predictors too)."""
    from mexit.decoding.early_exit import EarlyExit, ExitPolicy

    config, out = model.config, []
    measures = args.measures or ["max-prob", "margin", "cosine", *(["learned"] if model.predictors else [])]
    for measure in measures:
        for threshold in args.thresholds:
            for exit_set in args.exit_sets:
                for tau in args.decay_tau:
                    decay = None if str(tau).lower() == "none" else float(tau)
                    policy = ExitPolicy(threshold=threshold, measure=measure, exits=parse_exit_set(exit_set, config),
                                        decay_tau=decay, min_layer=args.min_layer, propagation=args.propagation,
                                        schedule=args.schedule)
                    EarlyExit(model, policy)
                    out.append(dict(measure=measure, threshold=threshold, exits=exit_set, decay_tau=decay,
                                    policy=policy, generate_kw=dict(early_exit=policy)))
    if args.draft_vocab and not args.spec:
        raise ValueError("--draft-vocab applies to --spec settings; none was given")
    for text in args.spec or []:
        import dataclasses

        from mexit.bench.latency import parse_mode
        from mexit.decoding.fixed import DecodeConfig

        for n in args.draft_vocab or [0]:  # 0: the full draft head
            spec = dataclasses.replace(parse_mode(f"spec:{text}", config)["speculative"], draft_vocab=n or None)
            spec.validate_for(model, DecodeConfig())  # with draft_vocab: the checkpoint's token counts
            exits = f"draft {spec.draft_exit}" + (f" vocab {n}" if n else "")
            out.append(dict(measure="speculative", threshold=spec.draft_threshold, exits=exits, decay_tau=None,
                            draft_len=spec.draft_len, generate_kw=dict(speculative=spec)))
    return out


def setting_key(setting: dict, run_id: str) -> str:
    return (f"{run_id}|{setting['measure']}|{setting['threshold']}|{setting['exits']}|{setting['decay_tau']}"
            f"{'|k=' + str(setting['draft_len']) if 'draft_len' in setting else ''}")


def timed_generate(lm, ids, batch, max_new, stats=None, **kw):
    """Generate every prompt in batches; returns (tokens per prompt, exit layers per prompt, seconds). stats:
    speculative counters summed over the batches land there."""
    import torch

    tokens, layers = [], []
    clock = DeviceClock(lm.model.device)
    if clock.cuda:
        torch.cuda.synchronize()
    start = clock.mark()
    for i in range(0, len(ids), batch):
        out = lm.generate(ids[i: i + batch], max_new, eos_token_id=None, **kw)
        tokens += out.tokens
        layers += out.exit_layers or [[lm.config.n_layer] * len(t) for t in out.tokens]
        if stats is not None:  # weight reads against full depth, weighted by the tokens each batch decoded
            st, rows = out.stats, len(out.tokens)
            decoded = st["decoded_tokens_per_row"] * rows
            stats["weight_bytes"] = stats.get("weight_bytes", 0) + st["weight_bytes_per_token"] * decoded
            stats["full_depth_weight_bytes"] = (stats.get("full_depth_weight_bytes", 0)
                                                + st["full_depth_weight_bytes_per_token"] * decoded)
            stats["decoded"] = stats.get("decoded", 0) + decoded
            for key, counter in zip(TRAFFIC, ("weight_blocks", "weight_heads", "weight_fill_blocks",
                                              "weight_predictors")):  # weights read per token of a row
                stats[key] = stats.get(key, 0) + st.get(counter, 0) / max(st["decoded_tokens_per_row"], 1e-9) * decoded
            if out.drafted is not None:
                for key in ("drafted", "accepted"):
                    stats[key] = stats.get(key, 0) + st[key]
    return tokens, layers, clock.ms(start, clock.mark()) / 1e3


def continuation_loglik(lm, prompt: list[int], continuation: list[int]) -> float:
    """Mean log-probability of `continuation` under the full model (original head), given `prompt`."""
    import torch

    model = lm.model
    seq = prompt + continuation
    with torch.inference_mode():
        cache = model.new_cache(1, len(seq))
        cache.valid.fill_(True)
        positions = torch.arange(len(seq), device=model.device)[None]
        h = model.embed(torch.tensor([seq], device=model.device), positions)
        h = model.run_layers(h, 0, model.config.n_layer, cache, 0)
        logprobs = model.head_logits(h[0, len(prompt) - 1: -1], "original").log_softmax(-1)
        return logprobs.gather(-1, torch.tensor(continuation, device=model.device)[:, None]).mean().item()


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    """1 - distinct n-grams / n-grams in a continuation (0: no repeated n-gram)."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def evaluate(lm, ids, setting, reference, args) -> dict:
    """Quality and cost of one setting. Its speed-up is timed interleaved with the full-depth reference
    (reference, setting, reference, setting, ...; `args.repeats` pairs, after an untimed warm-up of the setting):
    the median of the pairs' ratios with their min..max, so a row never depends on a baseline timed elsewhere."""
    timed_generate(lm, ids[: args.batch], args.batch, 2, **setting["generate_kw"])  # warm this path
    stats, ratios, ref_times, times = {}, [], [], []
    for repeat in range(args.repeats):
        _, _, ref_seconds = timed_generate(lm, ids, args.batch, args.max_new_tokens)
        tokens, layers, seconds = timed_generate(lm, ids, args.batch, args.max_new_tokens,
                                                 stats=stats if repeat == 0 else None, **setting["generate_kw"])
        ratios.append(ref_seconds / seconds)
        ref_times.append(ref_seconds)
        times.append(seconds)
    from mexit.decoding.stats import exit_histogram

    flat = [x for row in layers for x in row]
    histogram = exit_histogram(layers)
    note = spread_note(statistics.median(ratios), min(ratios), max(ratios))
    if note:
        print(f"warning: {setting['measure']} {setting['threshold']}: speed-up {note}", file=sys.stderr)
        extra_note = {"note": note}
    else:
        extra_note = {}
    agree = [sum(a == b for a, b in zip(t, r)) / len(r) for t, r in zip(tokens, reference)]
    extra = dict(extra_note, weight_bytes_ratio=stats["weight_bytes"] / stats["full_depth_weight_bytes"],
                 n_layer=lm.config.n_layer, **{key: stats[key] / stats["decoded"] for key in TRAFFIC})
    if "draft_len" in setting:
        extra.update(draft_len=setting["draft_len"], acceptance_rate=stats["accepted"] / max(stats["drafted"], 1))
    return dict(
        extra, measure=setting["measure"], threshold=setting["threshold"], exits=setting["exits"],
        decay_tau=setting["decay_tau"], mean_exit_layer=sum(flat) / len(flat), exit_histogram=histogram,
        seconds=statistics.median(times), full_depth_seconds=statistics.median(ref_times),
        speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios), repeats=args.repeats,
        agreement=sum(agree) / len(agree),
        loglik=sum(continuation_loglik(lm, p, t) for p, t in zip(ids, tokens)) / len(ids),
        repetition=sum(map(repetition_rate, tokens)) / len(tokens),
    )


def load_lm(args):
    import mexit
    from mexit.model.checkpoint import resolve_device

    device = resolve_device(args.device)
    set_threads(args.threads, device)
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if args.model:
        return mexit.load(args.model, dtype=dtype, device=device, backend=args.backend, engine=args.engine,
                        compile=args.compile), args.model
    lm = mexit.MultiExitLM.random(mexit.GPT2_MEDIUM_MULTIEXIT, dtype=dtype, device=device, backend=args.backend,
                                  engine=args.engine, compile=args.compile)
    return lm, "RANDOM weights, gpt2-medium-multiexit shape (quality numbers are meaningless)"


class Sweep:
    """What every setting of a sweep is measured against, prepared once per process (or Ray worker): the model,
    the validated settings, the encoded prompts, the run's metadata and id, and the full-depth reference (stage 1).
    `evaluate(i)` measures setting i: a row without its key."""

    def __init__(self, args):
        from mexit.decoding.prompts import check_prompts

        self.args = args
        self.lm, label = load_lm(args)
        lm = self.lm
        self.plan = settings(args, lm.model)  # validates everything before any generation
        for setting in self.plan:
            if "policy" in setting:
                setting["policy"].check_engine(lm.engine, lm.backend.name)
        self.ids, encoding = encode(lm, read_prompts(args.prompts))
        check_prompts(self.ids, lm.config, args.max_new_tokens)  # prompt + new tokens fit the context
        self.meta = dict(run_metadata(lm.model.device, lm.model.dtype), model=label, encoding=encoding,
                         engine=lm.engine, backend=lm.backend.name, prompts=str(args.prompts), n_prompts=len(self.ids),
                         max_new_tokens=args.max_new_tokens, batch=args.batch)
        # what the measured speed-up depends on: a resumed sweep reuses rows only from the same run settings
        self.run_id = hashlib.sha256(json.dumps([label, self.ids, args.max_new_tokens, args.batch, str(lm.model.dtype),
                                                 str(lm.model.device), lm.engine, lm.backend.name, lm.compile,
                                                 args.propagation, args.schedule]).encode()).hexdigest()[:12]
        timed_generate(lm, self.ids[: args.batch], args.batch, 2)  # warm-up (graph capture, kernel compilation)
        self.reference, _, self.reference_seconds = timed_generate(lm, self.ids, args.batch, args.max_new_tokens)

    def keys(self) -> list[str]:
        return [setting_key(s, self.run_id) for s in self.plan]

    def describe(self) -> tuple[str, list[str], dict]:
        """What a Ray driver checks the workers agree on: the run id, the settings' keys, the device."""
        return self.run_id, self.keys(), self.meta

    def evaluate(self, index: int) -> tuple[int, dict]:
        """Setting `index` measured: (index, its row, naming the process that timed it)."""
        from mexit.frontends.cluster import where

        return index, dict(self.meta, run_id=self.run_id, worker=where(),
                           **evaluate(self.lm, self.ids, self.plan[index], self.reference, self.args))

    def full_depth_row(self) -> dict:
        from mexit.frontends.cluster import where

        return dict(full_depth_row(self.lm, self.ids, self.reference, self.meta, self.reference_seconds, self.args),
                    worker=where())


def finished_rows(log: Path) -> dict[str, dict]:
    """Rows an earlier run wrote to ablation.jsonl, by key."""
    return {row["key"]: row for row in map(json.loads, log.read_text().splitlines())} if log.exists() else {}


def run(args) -> list[dict]:
    """The sweep in this process, or across a Ray cluster with --ray; rows are appended to ablation.jsonl as they
    finish (a rerun of the same command skips them), then the csv, the plot and the Pareto front are written."""
    args.prompts = args.prompts or default_prompts(args.model)
    read_prompts(args.prompts)
    if args.max_new_tokens < 1 or args.batch < 1 or args.repeats < 1:
        raise ValueError("--max-new-tokens, --batch and --repeats must be >= 1")
    out = Path(args.out)
    log = out / "ablation.jsonl"
    done = finished_rows(log)
    print(f"# stage 1/2: full-depth reference (prompts from {args.prompts}, batch {args.batch}, "
          f"{args.max_new_tokens} new tokens{', on every Ray worker' if args.ray else ''})", file=sys.stderr,
          flush=True)
    if args.ray:
        return run_on_ray(args, out, log, done)
    sweep = Sweep(args)
    keys = sweep.keys()
    todo = [i for i, key in enumerate(keys) if key not in done]
    expected = len(todo) * args.repeats * 2.5 * sweep.reference_seconds  # reference + setting (+ warm-up, quality)
    print(f"# stage 2/2: {sweep.meta['model']}: {len(keys)} settings, {len(keys) - len(todo)} already in {log}; "
          f"each timed {args.repeats}x interleaved with the full-depth reference; expected about {expected:.0f} s",
          file=sys.stderr, flush=True)
    record(map(sweep.evaluate, todo), keys, todo, out, log, done, args.quiet)
    return finish(sweep.full_depth_row(), keys, done, out, args)


def run_on_ray(args, out: Path, log: Path, done: dict) -> list[dict]:
    """Every setting a task on a Ray worker that timed it against its own full-depth reference (a speed-up never
    mixes machines); the workers must agree on the run (same prompts, settings, dtype, engine, backend and device
    kind)."""
    from mexit.frontends.cluster import Workers, absolute, connect, worker_resources

    args.model, args.prompts = absolute(args.model), absolute(args.prompts)  # workers start in other folders
    connect(args.ray)
    count, options = worker_resources(args.device, args.threads or 1)
    workers = Workers(Sweep, (args,), count, options)
    try:
        described = workers.call_all("describe")
        if len({(run_id, tuple(keys), meta["device"]) for run_id, keys, meta in described}) > 1:
            raise ValueError("the Ray workers disagree on the run (devices "
                             f"{sorted({meta['device'] for *_, meta in described})}); sweep each kind on its own")
        keys, meta = described[0][1], described[0][2]
        todo = [i for i, key in enumerate(keys) if key not in done]
        print(f"# stage 2/2: {meta['model']}: {len(keys)} settings, {len(keys) - len(todo)} already in {log}; "
              f"{len(todo)} across {count} Ray worker(s) ({meta['device']}), each timed {args.repeats}x interleaved "
              "with its worker's full-depth reference", file=sys.stderr, flush=True)
        record(workers.map("evaluate", todo), keys, todo, out, log, done, args.quiet)
        reference = workers.call_one("full_depth_row")
    except KeyboardInterrupt:
        print(f"error: interrupted; finished settings are in {log}: rerun the same command to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        workers.close()
    return finish(reference, keys, done, out, args)


def record(results, keys: list[str], todo: list[int], out: Path, log: Path, done: dict, quiet: bool) -> None:
    """Append each (index, row) to ablation.jsonl as it arrives, with a progress bar; Ctrl-C says what was saved."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    saved = 0
    try:
        with open(log, "a") as f, tqdm(total=len(todo), desc="ablation", unit="setting", disable=quiet) as bar:
            for index, row in results:
                row = dict(row, key=keys[index])
                f.write(json.dumps(row, allow_nan=False) + "\n")
                f.flush()
                done[row["key"]] = row
                saved += 1
                bar.update()
    except KeyboardInterrupt:
        print(f"error: interrupted: {saved} of {len(todo)} new settings saved in {log} "
              f"({len(keys) - len(todo) + saved} of {len(keys)} done); rerun the same command to resume",
              file=sys.stderr)
        raise SystemExit(130) from None


def finish(reference: dict, keys: list[str], done: dict, out: Path, args) -> list[dict]:
    rows = [reference] + [done[key] for key in keys]
    mark_pareto(rows)
    write_outputs(rows, out, plot=not args.no_plot)
    return rows


def full_depth_row(lm, ids, reference, meta, seconds: float, args) -> dict:
    """The reference as a row: what every setting is measured against."""
    n = lm.config.n_layer
    return dict(meta, measure="full depth", threshold=None, exits=None, decay_tau=None, mean_exit_layer=n,
                exit_histogram={str(n): sum(map(len, reference))}, weight_bytes_ratio=1.0, seconds=seconds,
                full_depth_seconds=seconds, speedup=1.0, speedup_min=1.0, speedup_max=1.0, repeats=1,
                agreement=1.0, loglik=sum(continuation_loglik(lm, p, t) for p, t in zip(ids, reference)) / len(ids),
                repetition=sum(map(repetition_rate, reference)) / len(reference))


def mark_pareto(rows: list[dict]) -> None:
    """pareto = True for the rows no other row beats on both speed-up and log-likelihood (ties kept)."""
    for r in rows:
        r["pareto"] = not any(o["speedup"] >= r["speedup"] and o["loglik"] >= r["loglik"]
                              and (o["speedup"] > r["speedup"] or o["loglik"] > r["loglik"]) for o in rows)


def describe(row: dict) -> str:
    if row["measure"] == "full depth":
        return "full depth"
    if row.get("draft_len"):
        return f"speculative, {row['exits']}, k={row['draft_len']}"
    tau = f", decay {row['decay_tau']:g}" if row.get("decay_tau") is not None else ""
    return f"{row['measure']} >= {row['threshold']:g}, exits {row['exits']}{tau}"


def pareto_summary(rows: list[dict]) -> str:
    """The settings worth using, fastest first: each with its speed-up, log-likelihood and agreement."""
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: -r["speedup"])
    lines = [f"- {describe(r)}: speed-up {r['speedup']:.2f} ({r['speedup_min']:.2f}..{r['speedup_max']:.2f}), "
             f"log-likelihood {r['loglik']:.3f}, agreement {r['agreement']:.2f}" for r in front]
    return "Worth using (no other setting is both faster and better by log-likelihood):\n" + "\n".join(lines)


COLUMNS = ["measure", "threshold", "exits", "decay_tau", "draft_len", "mean_exit_layer", "weight_bytes_ratio",
           "acceptance_rate", "speedup", "speedup_min", "speedup_max", "agreement", "loglik",
           "repetition", "pareto"]


def write_outputs(rows: list[dict], out: Path, plot: bool) -> None:
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + ["exit_histogram", "seconds", "full_depth_seconds"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows([dict(r, exit_histogram=json.dumps(r["exit_histogram"])) for r in rows])
    plt = pyplot() if plot else None
    if plt is not None:
        plot_rows(plt, rows, out / "ablation.png")


def plot_rows(plt, rows: list[dict], path: Path) -> None:
    """Log-likelihood and agreement against the measured speed-up: a curve per (measure, exit set) drawn in
    speed-up order, the full-depth reference as a star, the Pareto front circled and labelled."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    settings = [r for r in rows if r["measure"] != "full depth"]
    curves = list(dict.fromkeys((r["measure"], str(r["exits"])) for r in settings))
    exit_sets = list(dict.fromkeys(str(r["exits"]) for r in settings))
    for ax, key, label in ((axes[0], "loglik", "full model's mean log-likelihood of the output"),
                           (axes[1], "agreement", "token agreement with full depth")):
        for n, (measure, exit_set) in enumerate(curves):
            pts = sorted((r for r in settings if (r["measure"], str(r["exits"])) == (measure, exit_set)),
                         key=lambda r: r["speedup"])  # speed-up order: no zig-zag
            err = [[r["speedup"] - r["speedup_min"] for r in pts], [r["speedup_max"] - r["speedup"] for r in pts]]
            ax.errorbar([r["speedup"] for r in pts], [r[key] for r in pts], xerr=err, lw=0.8, capsize=2, ms=5,
                        fmt=markers[exit_sets.index(exit_set) % len(markers)] + "-", color=colours[n % len(colours)],
                        label=f"{measure}, exits {exit_set}")
        for r in rows:
            if r["measure"] == "full depth":
                ax.plot([r["speedup"]], [r[key]], "k*", ms=11, label="full depth")
        front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["speedup"])
        ax.plot([r["speedup"] for r in front], [r[key] for r in front], "o", mfc="none", mec="black", ms=11,
                label="Pareto front (speed-up, log-likelihood)")
        if key == "loglik":  # labels on the front only, alternating above and below
            for i, r in enumerate(front):
                text = "full depth" if r["measure"] == "full depth" else (
                    f"k={r['draft_len']}" if r.get("draft_len") else f"{r['measure']} {r['threshold']:g}")
                ax.annotate(text, (r["speedup"], r[key]), fontsize=7, textcoords="offset points",
                            xytext=(6, 9 if i % 2 else -13))
        ax.axvline(1.0, color="gray", lw=0.5)
        ax.set_xlabel("measured speed-up vs full depth (median, min..max)")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7, loc="best")
    r0 = rows[0]
    fig.suptitle(f"{r0['model']} | {r0['device']}, {r0['dtype']} | batch {r0.get('batch', '?')}, "
                 f"{r0.get('max_new_tokens', '?')} new tokens per prompt", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument("--model", help="checkpoint folder or hub id (default: RANDOM gpt2-medium-multiexit shape)")
    p.add_argument("--prompts", help="text file, one prompt per line (default: the model folder's prompts.txt, "
                   "else bench/prompts.txt)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95],
                   help="confidence thresholds to sweep")
    p.add_argument("--measures", nargs="+", default=None,
                   help="confidence measures to sweep: max-prob, margin, cosine, learned (default: those four, "
                        "learned where the checkpoint has exit predictors)")
    p.add_argument("--exit-sets", nargs="+", default=["all"], help="'all' or comma-separated exit layers")
    p.add_argument("--decay-tau", nargs="+", default=["none"], help="CALM decay tau values; 'none' = fixed")
    p.add_argument("--min-layer", type=int, default=1, help="no exit below this layer")
    p.add_argument("--draft-vocab", type=int, nargs="+", metavar="N",
                   help="each --spec setting also (0: the full head) with its draft head restricted to the N most "
                        "frequent tokens (the checkpoint's token_counts.safetensors)")
    p.add_argument("--spec", nargs="*", default=[],
                   help="self-speculative settings DRAFT_EXIT:K[:THRESHOLD] to add (lossless: agreement 1)")
    p.add_argument("--propagation", default="eager", choices=["eager", "deferred"],
                   help="skipped layers' keys/values computed at the exit, or with the next deep token")
    p.add_argument("--schedule", default="segments", choices=["segments", "predicated"],
                   help="fast-path early-exit schedule (predicated needs the triton backend)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--batch", type=int, default=10, help="prompts per generate call")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved (full depth, setting) timing pairs per setting; the speed-up is their median")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else 1 on CPU)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="Triton kernels or the PyTorch reference (auto: triton on cuda)")
    p.add_argument("--engine", default="auto", choices=["auto", "eager", "static", "graph"],
                   help="decode loop: CUDA graphs, the static step uncaptured, or eager (auto: graph on cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile the static step's layers")
    p.add_argument("--out", default="ablation_results", help="output folder (resumable)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="spread the settings over a Ray cluster: one worker per GPU (per --threads CPUs without "
                        "GPUs), each timing its settings against its own full-depth reference; 'auto' (the default "
                        "with --ray): the cluster this machine runs or a new local one; else a cluster address")


def main_args(args) -> int:
    rows = run(args)
    print(markdown_table(rows, COLUMNS))
    print(pareto_summary(rows))
    plotted = not args.no_plot and (Path(args.out) / "ablation.png").exists()
    print(f"wrote {args.out}/ablation.jsonl, ablation.csv" + (", ablation.png" if plotted else ""))
    return 0


def add_parser(sub) -> None:
    add_subcommand(sub, "ablate", "exit-threshold ablation: quality vs measured speed-up", add_arguments, main_args)


def main(argv=None) -> int:
    return script_main(__doc__, add_arguments, main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
