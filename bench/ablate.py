"""Exit-threshold ablation: what each early-exit setting costs in quality and buys in speed.

    mexit ablate --model PATH [--prompts FILE] --thresholds 0.5 0.7 0.9 --measures max-prob cosine \\
                 --exit-sets all 8,12,16 --decay-tau none 4 --max-new-tokens 32 --out ablation

For every setting (threshold x measure x exit set x decay schedule) over the prompt file (default: the model
folder's prompts.txt when it ships one, else a small general set shipped with mexit): mean exit layer and the
histogram of exit layers; the weight reads per token (bytes against full depth, blocks, heads, propagated blocks,
predictors); the speed-up against full-depth generation (same prompts, engine and device), timed in --repeats passes
interleaved batch by batch with the reference, with its 95% interval; per prompt, the full model's mean
log-likelihood of the generated continuation (a quality proxy) and the token agreement with full depth, and their
difference from full depth with its interval; the 4-gram repetition rate. The full-depth reference is a row of its
own. Settings that did identical work (same tokens, same weight reads) are one point; the points faster than full
depth beyond the noise that no other is faster or better than beyond the noise and the margins are worth using
(`mexit.bench.findings`). Writes ablation.jsonl (every row with the run's settings, model, versions and its timing
passes; resumable: finished settings are not rerun, on one machine or Ray alike, and a resume under other run
settings is refused), ablation.jsonl.settings.json, ablation.csv and ablation.png. Every setting is validated
before any work starts."""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

from mexit.bench.common import (
    TRAFFIC,
    add_subcommand,
    markdown_table,
    run_metadata,
    script_main,
    set_threads,
    spread_note,
)
from mexit.bench.findings import LOGLIK_MARGIN, SPEED_MARGIN
from mexit.frontends.cli import add_load_args, hub_kwargs
from mexit.frontends.output import pyplot
from mexit.timing import DeviceClock, interleaved_pairs

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")


def default_prompts(model) -> Path:
    """The model folder's own prompts.txt (prompts in the model's domain), else mexit's general set."""
    from mexit.model.files import PROMPTS_FILE  # (imports torch: not at `--help`)

    own = Path(model) / PROMPTS_FILE if model else None
    return own if own is not None and own.is_file() else DEFAULT_PROMPTS


def read_prompts(path) -> list[dict]:
    """The prompts file's records (`mexit.frontends.datasets.read_prompt_file`: text lines exactly as written, or
    JSON lines of "prompt" / "input_ids"), as `mexit generate --prompts-file` reads it."""
    from mexit.frontends.datasets import read_prompt_file

    return read_prompt_file(path)


def encode(lm, records: list[dict], max_new_tokens: int | None = None, path=None) -> tuple[list[list[int]], str]:
    """Token ids of `read_prompts`' records: text through the tokenizer, or (no tokenizer: random-weight models)
    its UTF-8 bytes modulo the vocabulary, labelled; ids as given. Every prompt is checked before any work (it fits
    the context with max_new_tokens; ids in the vocabulary): ValueError naming the lines of `path` that do not."""
    from mexit.frontends.datasets import bad_prompts, refuse_bad_prompts

    if lm.tokenizer is not None:
        one, encoding = (lambda text: lm.tokenizer.encode(text, verbose=False)), "tokenizer"
    else:
        one, encoding = (lambda text: [b % lm.config.vocab_size for b in text.encode()]), "utf-8 bytes (no tokenizer)"
    one = functools.cache(one)  # the check and the result tokenize each text once
    bad = bad_prompts(records, one, lm.config, max_new_tokens)
    if bad:
        refuse_bad_prompts(path, records, bad, "fix or remove them, or lower --max-new-tokens")
    return [one(r["prompt"]) if "prompt" in r else r["input_ids"] for r in records], encoding


def parse_exit_set(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    try:
        exits = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"exit set {text!r}: use 'all' or comma-separated layers like 8,12,16") from None
    return exits


def number(flag: str, text) -> float:
    """A flag's value as a float, or a ValueError naming the flag."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag}: expected a number, got {text!r}") from None


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
                    decay = None if str(tau).lower() == "none" else number("--decay-tau", tau)
                    try:
                        policy = ExitPolicy(threshold=threshold, measure=measure, exits=parse_exit_set(exit_set),
                                            decay_tau=decay, min_layer=args.min_layer, propagation=args.propagation,
                                            schedule=args.schedule)
                        EarlyExit(model, policy)
                    except ValueError as err:  # named by the flags that made the setting
                        raise ValueError(f"setting --measures {measure} --thresholds {threshold} --exit-sets "
                                         f"{exit_set} --decay-tau {tau} --min-layer {args.min_layer}: {err}") from None
                    out.append(dict(measure=measure, threshold=threshold, exits=exit_set, decay_tau=decay,
                                    policy=policy, generate_kw=dict(early_exit=policy)))
    if args.draft_vocab and not args.spec:
        raise ValueError("--draft-vocab applies to --spec settings; none was given")
    for text in args.spec or []:
        import dataclasses

        from mexit.decoding import modes
        from mexit.decoding.heads import DecodeConfig

        for n in args.draft_vocab or [0]:  # 0: the full draft head
            speculation = modes.parse(f"spec:{text}", config)
            if speculation.target != DecodeConfig():  # the original head
                raise ValueError(f"--spec {text}: the ablation measures against the original head at full depth; "
                                 "another target is `mexit bench-speculative --target`")
            spec = dataclasses.replace(speculation.spec, draft_vocab=n or None)
            modes.build(model, dataclasses.replace(speculation, spec=spec))  # draft_vocab: the checkpoint's counts
            exits = f"draft {spec.draft_exit}" + (f" vocab {n}" if n else "")
            out.append(dict(measure="speculative", threshold=spec.draft_threshold, exits=exits, decay_tau=None,
                            draft_len=spec.draft_len, generate_kw=dict(speculative=spec)))
    names = [describe(setting) for setting in out]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"setting {twice[0]!r} is listed twice (a repeated threshold, measure or exit set): list "
                         "each once")
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
        n = model.config.n_layer
        h = model.forward(torch.tensor([seq], device=model.device), [n])[1][n]
        logprobs = model.head_logits(h[0, len(prompt) - 1: -1], "original").log_softmax(-1)
        return logprobs.gather(-1, torch.tensor(continuation, device=model.device)[:, None]).mean().item()


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    """1 - distinct n-grams / n-grams in a continuation (0: no repeated n-gram)."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def timed_pairs(lm, ids, setting, args, stats: dict) -> tuple[list, list, list]:
    """`args.repeats` passes over the prompts, each timing the setting and the full-depth reference batch by batch,
    interleaved (`mexit.timing.interleaved_pairs`); a pass gives one pair [reference seconds, setting seconds] of its
    totals. Returns (pairs, the setting's tokens and exit layers per prompt from the first pass); stats: its weight
    reads."""
    chunks = [ids[i: i + args.batch] for i in range(0, len(ids), args.batch)]
    tokens, layers = [], []

    def reference(_, c: int) -> float:
        return timed_generate(lm, chunks[c], args.batch, args.max_new_tokens)[2]

    def timed_setting(repeat: int, c: int) -> float:
        t, layer, seconds = timed_generate(lm, chunks[c], args.batch, args.max_new_tokens,
                                           stats=stats if repeat == 0 else None, **setting["generate_kw"])
        if repeat == 0:
            tokens.extend(t)
            layers.extend(layer)
        return seconds

    return interleaved_pairs(reference, timed_setting, args.repeats, len(chunks)), tokens, layers


def quality(lm, ids, tokens, reference) -> dict:
    """Per prompt: the full model's mean log-likelihood of the continuation, token agreement with full depth, the
    4-gram repetition rate; their means, and the outputs' digest."""
    from mexit.bench.findings import tokens_digest

    loglik = [continuation_loglik(lm, p, t) for p, t in zip(ids, tokens)]
    agree = [sum(a == b for a, b in zip(t, r)) / len(r) for t, r in zip(tokens, reference)]
    return dict(loglik=statistics.fmean(loglik), loglik_per_prompt=loglik, agreement=statistics.fmean(agree),
                agreement_per_prompt=agree, repetition=statistics.fmean(map(repetition_rate, tokens)),
                tokens_digest=tokens_digest(tokens))


def evaluate(lm, ids, setting, reference, args) -> dict:
    """Quality and cost of one setting: `timed_pairs` against the full-depth reference (after an untimed warm-up of
    the setting) with the speed-up's 95% interval (`findings.speedup_interval`), the per-prompt quality, the weight
    reads per token and the exit layers."""
    from mexit.bench.findings import speedup_interval
    from mexit.decoding.stats import exit_histogram

    for chunk in {len(c): c for c in (ids[: args.batch], ids[-(len(ids) % args.batch or args.batch):])}.values():
        timed_generate(lm, chunk, args.batch, args.max_new_tokens, **setting["generate_kw"])  # warm each bucket
    stats = {}
    pairs, tokens, layers = timed_pairs(lm, ids, setting, args, stats)
    flat = [x for row in layers for x in row]
    speed = speedup_interval(pairs)
    note = spread_note(speed["speedup"], speed["speedup_lo"], speed["speedup_hi"], limit=0.1)
    if note:
        print(f"warning: {describe(setting)}: speed-up interval {note}", file=sys.stderr)
    extra = dict(weight_bytes_ratio=stats["weight_bytes"] / stats["full_depth_weight_bytes"],
                 n_layer=lm.config.n_layer, **{key: stats[key] / stats["decoded"] for key in TRAFFIC})
    if note:
        extra["note"] = note
    if "draft_len" in setting:
        extra.update(draft_len=setting["draft_len"], acceptance_rate=stats["accepted"] / max(stats["drafted"], 1))
    row = dict(extra, measure=setting["measure"], threshold=setting["threshold"], exits=setting["exits"],
               decay_tau=setting["decay_tau"], mean_exit_layer=sum(flat) / len(flat),
               exit_histogram=exit_histogram(layers), seconds=statistics.median(t for _, t in pairs),
               full_depth_seconds=statistics.median(ref for ref, _ in pairs), pairs=pairs, repeats=args.repeats,
               **speed, **quality(lm, ids, tokens, reference))
    return dict(row, label=describe(row))


def load_lm(args):
    import mexit
    from mexit.model.placement import resolve_device

    device = resolve_device(args.device)
    set_threads(args.threads, device)
    if args.model:  # dtype None: mexit's default for the device
        return mexit.load(args.model, dtype=args.dtype, device=device, backend=args.backend, engine=args.engine,
                          compile=args.compile, check_weights=not args.no_weight_check, **hub_kwargs(args)), args.model
    lm = mexit.MultiExitLM.random(mexit.GPT2_MEDIUM_MULTIEXIT, dtype=args.dtype, device=device, backend=args.backend,
                                  engine=args.engine, compile=args.compile)
    return lm, "RANDOM weights, gpt2-medium-multiexit shape (quality numbers are meaningless)"


class Sweep:
    """What every setting of a sweep is measured against, prepared once per process (or Ray worker): the model,
    the validated settings, the encoded prompts, the run's metadata and id, and the full-depth reference (stage 1,
    `measure_reference`: run on first need, so a resume's settings check comes first and a refusal costs no
    generation, and a restarted Ray worker measures its own again). `evaluate(i)` measures setting i: a row without
    its key."""

    def __init__(self, args):
        from mexit.frontends.cli import check_schedule

        self.args = args
        self.lm, label = load_lm(args)
        lm = self.lm
        check_schedule(args.schedule, lm.engine, f"--schedule {args.schedule}")
        self.plan = settings(args, lm.model)  # validates everything before any generation
        for setting in self.plan:
            if "policy" in setting:
                setting["policy"].check_engine(lm.engine, lm.backend.name)
        self.ids, encoding = encode(lm, read_prompts(args.prompts), args.max_new_tokens, args.prompts)
        self.meta = dict(run_metadata(lm.model.device, lm.model.dtype), model=label, revision=args.revision,
                         subfolder=args.subfolder, encoding=encoding,
                         engine=lm.engine, backend=lm.backend.name, prompts=str(args.prompts), n_prompts=len(self.ids),
                         max_new_tokens=args.max_new_tokens, batch=args.batch, repeats=args.repeats,
                         prompts_digest=hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()[:16])
        # what the measured speed-up depends on: a resumed sweep reuses rows only from the same run settings
        self.run_id = hashlib.sha256(json.dumps([label, self.ids, args.max_new_tokens, args.batch, str(lm.model.dtype),
                                                 str(lm.model.device), lm.engine, lm.backend.name, lm.compile,
                                                 args.propagation, args.schedule, args.revision,
                                                 args.subfolder]).encode()).hexdigest()[:12]
        self.reference = self.reference_seconds = None

    def measure_reference(self) -> float:
        """The full-depth tokens of every prompt (after a warm-up: graph capture, kernel compilation), once; their
        seconds."""
        if self.reference is None:
            lm, args = self.lm, self.args
            timed_generate(lm, self.ids[: args.batch], args.batch, 2)
            self.reference, _, self.reference_seconds = timed_generate(lm, self.ids, args.batch, args.max_new_tokens)
        return self.reference_seconds

    def keys(self) -> list[str]:
        return [setting_key(s, self.run_id) for s in self.plan]

    def describe(self) -> tuple[str, list[str], dict]:
        """What a Ray driver checks the workers agree on: the run id, the settings' keys, the device."""
        return self.run_id, self.keys(), self.meta

    def evaluate(self, index: int) -> tuple[int, dict]:
        """Setting `index` measured: (index, its row, naming the process that timed it)."""
        from mexit.frontends.cluster import where

        self.measure_reference()
        return index, dict(self.meta, run_id=self.run_id, worker=where(),
                           **evaluate(self.lm, self.ids, self.plan[index], self.reference, self.args))

    def full_depth_row(self) -> dict:
        from mexit.frontends.cluster import where

        self.measure_reference()
        return dict(full_depth_row(self.lm, self.ids, self.reference, self.meta, self.reference_seconds, self.args),
                    worker=where())


def finished_rows(log: Path) -> dict[str, dict]:
    """Rows an earlier run wrote to ablation.jsonl, by key (a partial last line dropped: that setting runs again)."""
    from mexit.frontends.datasets import complete_lines

    if not log.exists():
        return {}
    rows = {}
    for n, line in enumerate(complete_lines(log, "that setting is measured again").splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or "key" not in row:
            raise ValueError(f"{log} line {n + 1} is not an ablation row: not a file this command wrote; use another "
                             "--out")
        if "pairs" not in row and row.get("measure") != "full depth":
            raise ValueError(f"{log} line {n + 1} was written by an older mexit (no timing passes or per-prompt "
                             "quality): use another --out")
        rows[row["key"]] = row
    return rows


def run_settings(meta: dict, args) -> dict:
    """What a run's rows depend on, recorded beside ablation.jsonl (`datasets.check_settings`): a resume under
    other settings is refused by name, whichever executor (this process or --ray) wrote the rows."""
    keys = ("prompts_digest", "n_prompts", "encoding", "batch", "max_new_tokens", "repeats", "engine", "backend",
            "device", "threads")
    return {"model": meta["model"], "dtype": meta["dtype"],
            "generate": dict({k: meta[k] for k in keys}, compile=args.compile, propagation=args.propagation,
                             schedule=args.schedule, min_layer=args.min_layer)}


def run(args) -> tuple[list[dict], list]:
    """The sweep in this process, or across a Ray cluster with --ray; rows are appended to ablation.jsonl as they
    finish (a rerun of the same command skips them, whichever executor wrote them), then the csv, the plot and the
    findings are written. Returns the rows (full depth first) and the front (`findings.mark_front`)."""
    from mexit.frontends.cluster import absolute

    args.prompts = args.prompts or default_prompts(args.model)
    read_prompts(args.prompts)
    if args.max_new_tokens < 1 or args.batch < 1 or args.repeats < 2:
        raise ValueError("--max-new-tokens and --batch must be >= 1, --repeats >= 2 (an interval needs two passes)")
    for flag, margin in (("--speed-margin", args.speed_margin), ("--loglik-margin", args.loglik_margin)):
        if not 0 <= margin < math.inf:
            raise ValueError(f"{flag} must be a finite number >= 0, got {margin}")
    args.model, args.prompts = absolute(args.model), absolute(args.prompts)  # one name whatever the executor or cwd
    from mexit.frontends.output import check_output_folder

    check_output_folder(args.out)
    out = Path(args.out)
    log = out / "ablation.jsonl"
    done = finished_rows(log)
    if args.ray:
        print_stage_one(args)
        return run_on_ray(args, out, log, done)
    sweep = Sweep(args)
    check_run(log, sweep.meta, args, done)
    print_stage_one(args)  # once the settings are checked
    keys = sweep.keys()
    todo = [i for i, key in enumerate(keys) if key not in done]
    expected = len(todo) * args.repeats * 2.2 * sweep.measure_reference()  # reference + setting (+ warm-up, quality)
    print(f"# stage 2/2: {sweep.meta['model']}: {len(keys)} settings, {len(keys) - len(todo)} already in {log}; "
          f"each timed in {args.repeats} passes interleaved with the full-depth reference; expected about "
          f"{expected:.0f} s", file=sys.stderr, flush=True)
    record(map(sweep.evaluate, todo), keys, todo, out, log, done, args.quiet)
    return finish(sweep.full_depth_row(), keys, done, out, args)


def print_stage_one(args) -> None:
    print(f"# stage 1/2: full-depth reference (prompts from {args.prompts}, batch {args.batch}, "
          f"{args.max_new_tokens} new tokens{', on every Ray worker' if args.ray else ''})", file=sys.stderr,
          flush=True)


def check_run(log: Path, meta: dict, args, done: dict) -> None:
    """Refuse to resume `log` under other run settings (named), else record them beside it."""
    from mexit.frontends.datasets import check_settings
    from mexit.version import dependency_versions

    check_settings(log, dict(run_settings(meta, args), versions=dependency_versions()), resuming=bool(done))


def run_on_ray(args, out: Path, log: Path, done: dict) -> list[dict]:
    """Every setting a task on a Ray worker that timed it against its own full-depth reference (a speed-up never
    mixes machines); the workers must agree on the run (same prompts, settings, dtype, engine, backend and device
    kind)."""
    from mexit.frontends.cluster import Workers, connect, worker_resources

    connect(args.ray)
    count, options = worker_resources(args.device, args.threads or 1)
    workers = Workers(Sweep, (args,), count, options)
    try:
        described = workers.call_all("describe")
        if len({(run_id, tuple(keys), meta["device"]) for run_id, keys, meta in described}) > 1:
            raise ValueError("the Ray workers disagree on the run (devices "
                             f"{sorted({meta['device'] for *_, meta in described})}); sweep each kind on its own")
        keys, meta = described[0][1], described[0][2]
        check_run(log, meta, args, done)
        todo = [i for i, key in enumerate(keys) if key not in done]
        if todo:  # every worker times its settings against its own reference (else worker 0 measures it lazily)
            workers.call_all("measure_reference")
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


def finish(reference: dict, keys: list[str], done: dict, out: Path, args) -> tuple[list[dict], list]:
    """Every row of this run (full depth first), marked by `findings.mark_front`, written out; and the front."""
    from mexit.bench.findings import mark_front

    rows = [reference] + [done[key] for key in keys]
    front = mark_front(rows, args.speed_margin, args.loglik_margin)
    write_outputs(rows, out, plot=not args.no_plot)
    return rows, front


def full_depth_row(lm, ids, reference, meta, seconds: float, args) -> dict:
    """The reference as a row: what every setting is measured against."""
    n = lm.config.n_layer
    return dict(meta, measure="full depth", threshold=None, exits=None, decay_tau=None, mean_exit_layer=n,
                exit_histogram={str(n): sum(map(len, reference))}, weight_bytes_ratio=1.0, seconds=seconds,
                full_depth_seconds=seconds, speedup=1.0, speedup_lo=1.0, speedup_hi=1.0, pairs=[], label="full depth",
                **quality(lm, ids, reference, reference))


def describe(row: dict) -> str:
    if row["measure"] == "full depth":
        return "full depth"
    if row.get("draft_len"):
        return f"speculative, {row['exits']}, k={row['draft_len']}"
    tau = f", decay {row['decay_tau']:g}" if row.get("decay_tau") is not None else ""
    return f"{row['measure']} >= {row['threshold']:g}, exits {row['exits']}{tau}"


def findings_summary(rows: list[dict], front) -> str:
    """The settings worth using, fastest first, each with its speed-up and log-likelihood difference from full depth
    (95% intervals) and its agreement; then what the others were."""
    lines = []
    for point in front:
        speedup, lo, hi = point.interval()
        r = point.rows[0]
        same = f" (identical work: {len(point.rows)} settings, one point)" if len(point.rows) > 1 else ""
        lines.append(f"- {point.label}: speed-up {speedup:.2f} [{lo:.2f}, {hi:.2f}], log-likelihood "
                     f"{r['loglik_delta']:+.3f} [{r['loglik_delta_lo']:+.3f}, {r['loglik_delta_hi']:+.3f}] vs full "
                     f"depth, agreement {r['agreement']:.2f}, weight bytes {r['weight_bytes_ratio']:.2f}x{same}")
    settings = rows[1:]
    slower = sum(not r["faster_than_full_depth"] for r in settings)
    beaten = sum(r["faster_than_full_depth"] and not r["worth_using"] for r in settings)
    head = ("Worth using (faster than full depth beyond the noise, and no other setting faster or better beyond "
            "the noise and the margins; 95% intervals):")
    tail = (f"Not faster than full depth beyond the noise: {slower} setting(s); faster but beaten by a setting "
            f"above: {beaten}.")
    return "\n".join([head, *(lines or ["- none: keep full depth"]), tail])


COLUMNS = ["measure", "threshold", "exits", "decay_tau", "draft_len", "mean_exit_layer", "weight_bytes_ratio",
           *TRAFFIC, "acceptance_rate", "agreement", "loglik", "loglik_delta", "loglik_delta_lo", "loglik_delta_hi",
           "repetition", "speedup", "speedup_lo", "speedup_hi", "faster_than_full_depth", "worth_using"]


def write_outputs(rows: list[dict], out: Path, plot: bool) -> None:
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + ["point", "exit_histogram", "seconds", "full_depth_seconds",
                                                         "timed_pairs"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows([dict(r, exit_histogram=json.dumps(r["exit_histogram"])) for r in rows])
    plt = pyplot() if plot else None
    if plt is not None:
        plot_rows(plt, rows, out / "ablation.png")


def plot_rows(plt, rows: list[dict], path: Path) -> None:
    """Log-likelihood difference from full depth and agreement against the measured speed-up, 95% intervals on
    both axes: a curve per (measure, exit set) through its thresholds in order (the sweep's parameter, its first and
    last threshold written at the ends), full depth as a star at (1, 0), the settings worth using circled and
    labelled (labels stacked so they do not collide). The title names the model, device, dtype, engine, batch and
    length."""
    front = sorted((r for r in rows[1:] if r["worth_using"]), key=lambda r: -r["speedup"])
    listing = [f"{i + 1}: {r['label']}: speed-up {r['speedup']:.2f} [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}], "
               f"log-likelihood {r['loglik_delta']:+.3f} [{r['loglik_delta_lo']:+.3f}, {r['loglik_delta_hi']:+.3f}]"
               for i, r in enumerate(front)] or ["no setting is faster than full depth beyond the noise"]
    height = 5 + 0.13 * (len(listing) + 1)  # inches: the panels and the listing under them
    fig, axes = plt.subplots(1, 2, figsize=(14, height), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    settings = [r for r in rows if r["measure"] != "full depth"]
    curves = list(dict.fromkeys((r["measure"], str(r["exits"]), r.get("decay_tau")) for r in settings))
    exit_sets = list(dict.fromkeys(str(r["exits"]) for r in settings))
    for ax, key, label in ((axes[0], "loglik_delta", "log-likelihood vs full depth (nats/token, full model)"),
                           (axes[1], "agreement", "token agreement with full depth")):
        for n, curve in enumerate(curves):
            pts = sorted((r for r in settings if (r["measure"], str(r["exits"]), r.get("decay_tau")) == curve),
                         key=lambda r: (r.get("draft_len") or 0, r["threshold"]))
            x = [r["speedup"] for r in pts]
            y = [r[key] for r in pts]
            xerr = [[r["speedup"] - r["speedup_lo"] for r in pts], [r["speedup_hi"] - r["speedup"] for r in pts]]
            yerr = ([[r[key] - r["loglik_delta_lo"] for r in pts], [r["loglik_delta_hi"] - r[key] for r in pts]]
                    if key == "loglik_delta" else None)
            measure, exit_set, tau = curve
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, lw=0.8, capsize=2, ms=5, color=colours[n % len(colours)],
                        fmt=markers[exit_sets.index(exit_set) % len(markers)] + "-",
                        label=f"{measure}, exits {exit_set}" + (f", decay {tau:g}" if tau is not None else ""))
            if len(pts) > 1 and not pts[0].get("draft_len"):  # the sweep's direction
                for r in (pts[0], pts[-1]):
                    ax.annotate(f"{r['threshold']:g}", (r["speedup"], r[key]), fontsize=6, color=colours[n % len(
                        colours)], textcoords="offset points", xytext=(-4, 5))
        reference = rows[0]
        ax.plot([1.0], [reference[key]], "k*", ms=11, label="full depth")
        ax.plot([r["speedup"] for r in front], [r[key] for r in front], "o", mfc="none", mec="black", ms=12,
                label="worth using (beyond the noise)")
        for i, r in enumerate(front):  # numbers, listed under the panels (labels would collide)
            ax.annotate(str(i + 1), (r["speedup"], r[key]), fontsize=7, fontweight="bold",
                        textcoords="offset points", xytext=(7, (4, -10, 16)[i % 3]))  # close points: stacked
        ax.axvline(1.0, color="gray", lw=0.5)
        ax.set_xlabel("speed-up vs full depth (interleaved, 95% interval)")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: it hides no point
    r0 = rows[0]
    fig.suptitle(f"{Path(str(r0['model'])).name or r0['model']} | {r0['device']}, {r0['dtype']}, engine "
                 f"{r0.get('engine', '?')} | batch {r0.get('batch', '?')}, {r0.get('max_new_tokens', '?')} new tokens, "
                 f"{r0.get('n_prompts', '?')} prompts, {r0.get('repeats', '?')} timed passes per setting",
                 fontsize=8)
    fig.text(0.01, 0.01, "worth using:\n" + "\n".join(listing), fontsize=7, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, (0.1 + 0.13 * (len(listing) + 1)) / height, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument("--model", help="checkpoint folder or hub id (default: RANDOM gpt2-medium-multiexit shape)")
    p.add_argument("--prompts", help="prompts file as --prompts-file takes it: text, one prompt per line, or JSON "
                   "lines (default: the model folder's prompts.txt, "
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
                   help="self-speculative settings DRAFT_EXIT:K[:THRESHOLD] to add, of the original head (lossless: "
                   "agreement 1)")
    p.add_argument("--propagation", default="eager", choices=["eager", "deferred"],
                   help="skipped layers' keys/values computed at the exit, or with the next deep token")
    p.add_argument("--schedule", default="segments", choices=["segments", "predicated"],
                   help="the static / graph engines' early-exit schedule (predicated needs the triton backend)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--batch", type=int, default=10, help="prompts per generate call")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed passes per setting over the prompts, each interleaved batch by batch with the "
                        "full-depth reference (>= 2): the speed-up's 95%% interval comes from their spread")
    p.add_argument("--speed-margin", type=float, default=SPEED_MARGIN,
                   help="speed-ups closer than this fraction are ties when the front is drawn")
    p.add_argument("--loglik-margin", type=float, default=LOGLIK_MARGIN,
                   help="log-likelihoods closer than this (nats per token) are ties when the front is drawn")
    add_load_args(p)
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else 1 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the static step's layers")
    p.add_argument("--out", default="ablation_results", help="output folder (resumable)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="spread the settings over a Ray cluster: one worker per GPU (per --threads CPUs without "
                        "GPUs), each timing its settings against its own full-depth reference; 'auto' (the default "
                        "with --ray): the cluster this machine runs or a new local one; else a cluster address")


def main_args(args) -> int:
    rows, front = run(args)
    print(markdown_table(rows, COLUMNS))
    print(findings_summary(rows, front))
    plotted = not args.no_plot and (Path(args.out) / "ablation.png").exists()
    print(f"wrote {args.out}/ablation.jsonl, ablation.csv" + (", ablation.png" if plotted else ""))
    return 0


def add_parser(sub) -> None:
    add_subcommand(sub, "ablate", "exit-threshold ablation: quality vs measured speed-up", add_arguments, main_args)


def main(argv=None) -> int:
    return script_main(__doc__, add_arguments, main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
