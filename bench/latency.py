"""Latency benchmark: mexit's modes against transformers' generate, on the same weights, in one run.

    mexit bench                                   # random-weight gpt2-medium-multiexit shape (labeled RANDOM)
    mexit bench --model PATH --batch 1 8 --prompt-len 32 --new-tokens 128 --modes original exit:12 acd:24,12
    python -m mexit.bench.latency ...                   # the same

Modes: the mode mini-language (`mexit.decoding.modes`): `original`, `exit:L`, `acd:UPPER,LOWER` (UPPER may be
`original`), `dola:low|high|L1,L2[:exit]`, `spec:DRAFT_EXIT:K[:THRESHOLD][@TARGET]` (self-speculative decoding of
the original head, or of TARGET such as `acd:24,12`: drafts from that exit, K per verification, on any engine; its
rows add acceptance, device-to-host reads per round and launches per generated token),
`ee:MEASURE:THRESHOLD[:L1,L2,..|all][:eager|deferred|predicated]` (early exit with that propagation, or eager
propagation on the predicated one-graph schedule; threshold 0 with one layer exits every token there).
For each mode and batch size it reports prefill time and per-token decode time, both measured inside each
generation (CUDA events recorded at its start, its first token and its last token; a host clock on CPU), after
untimed warm-up generations of the same shape, as medians over repeats with min..max spread; tokens/s; and the
roofline: bytes a decode step must read (weights of the layers and heads it runs, plus the KV cache) over the
memory bandwidth measured in the same run (the higher of a device copy and a read-only reduction). Writes JSON +
CSV rows, a markdown table and a PNG plot."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import itertools
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mexit.bench.common import (
    TRAFFIC,
    add_subcommand,
    copy_bandwidth_gbs,
    launches_per_step,
    markdown_table,
    read_bandwidth_gbs,
    run_metadata,
    script_main,
    set_threads,
    spread_note,
    write_results,
)
from mexit.frontends.cli import add_load_args, hub_kwargs
from mexit.frontends.output import check_output_folder, pyplot

if TYPE_CHECKING:
    import torch

INVOKED_AS = {"mexit": "mexit", "__main__.py": "python -m mexit"}  # how the recorded command starts
ACD_GEN_MISSING = ("not installed: autocontrastive-gen 0.2.0 pins torch 1.11 / transformers 4.26; try "
                   "`pip install --no-deps autocontrastive-gen` (its MultiHeadGPT2 targets transformers 4.x)")


def default_modes(config) -> list[str]:
    exits = [e for e in config.exit_layers if e < config.n_layer]
    if not exits:
        return ["original"]
    mid = min(exits, key=lambda e: abs(e - config.n_layer / 2))
    top = config.n_layer if config.n_layer in config.exit_layers else "original"
    return ["original", f"exit:{mid}", f"acd:{top},{mid}", f"ee:max-prob:0:{mid}"]


def step_bytes(config, dtype, batch: int, context: int, layers: float, heads: float, filled: float = 0.0,
               predictors: float = 0.0) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one decode step must move: the weights of `layers` blocks and `heads` exit
    heads, the k|v weights of `filled` propagated blocks and `predictors` learned exit predictors (d + 1 fp32 each);
    the KV cache the blocks run read (context positions, batch rows). The roofline's floor is their sum."""
    from mexit.decoding.stats import weight_bytes

    kv = layers * 2 * batch * context * config.n_embd * dtype.itemsize
    return weight_bytes(config, dtype, layers, heads, filled, predictors), kv


def mode_traffic(stats: dict) -> tuple[float, float, float, float]:
    """(blocks, heads, propagated blocks, predictors) whose weights one decode step reads, from the run's counters
    (averages
    over its decode steps; speculative decoding: per generated token of a row, every pass reading its weights once
    for all rows)."""
    per = max(stats["tokens_per_row"] - 1, 1e-9) if "rounds" in stats else max(stats["steps"], 1)
    return (stats["weight_blocks"] / per, stats["weight_heads"] / per, stats["weight_fill_blocks"] / per,
            stats.get("weight_predictors", 0) / per)


CACHE_RESIDENT_BYTES = 256e6  # below this a step may run from caches, faster than memory bandwidth allows


def timing_row(meta, impl, mode, batch, timing, nbytes, bandwidth_gbs) -> dict:
    """A results row: timings, tokens/s, bytes per step and the roofline against the measured memory bandwidth
    (the higher of the copy and read bandwidths measured in the same run). A timing that is not physically
    possible (not positive; for a step larger than any cache, faster than its bytes / bandwidth by more than 10%)
    is never written as a number: the row carries `invalid` with the reason instead."""
    floor_ms = nbytes / (bandwidth_gbs * 1e9) * 1e3
    row = dict(meta, impl=impl, mode=mode, batch=batch, step_mb=nbytes / 1e6, floor_ms=floor_ms,
               bandwidth_gb_s=bandwidth_gbs)
    problem = None
    if not (timing["prefill_ms"] > 0 and timing["ms_per_token_min"] > 0):
        problem = (f"non-positive time (prefill {timing['prefill_ms']:.4g} ms, fastest decode step "
                   f"{timing['ms_per_token_min']:.4g} ms)")
    elif nbytes > CACHE_RESIDENT_BYTES and timing["ms_per_token"] < 0.9 * floor_ms:
        problem = (f"decode step {timing['ms_per_token']:.4g} ms is below the bandwidth floor {floor_ms:.4g} ms "
                   f"({nbytes / 1e6:.1f} MB at {bandwidth_gbs:.0f} GB/s)")
    if problem:
        return dict(row, invalid=problem)
    row = dict(row, **timing, tokens_per_s=batch * 1e3 / timing["ms_per_token"],
               pct_roofline=100 * floor_ms / timing["ms_per_token"])
    note = spread_note(timing["ms_per_token"], timing["ms_per_token_min"], timing["ms_per_token_max"])
    if note:
        print(f"warning: {impl} {mode} batch {batch}: {note}", file=sys.stderr)
        row["note"] = note
    return row


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Marks inside one generation: its start, its first token (prompt + first head) and its last token, on the
    device clock (`mexit.timing.DeviceClock`: CUDA events recorded in stream order when the host reaches each
    point, so the device's own time; perf_counter on CPU)."""

    def __init__(self, device: torch.device):
        from mexit.timing import DeviceClock

        self.clock = DeviceClock(device)
        self.device = device
        self.begin = self.first = self.last = None
        self.tokens = 0

    def start(self) -> None:
        sync(self.device)
        self.begin = self.clock.mark()

    def on_token(self, *_args) -> None:
        now = self.clock.mark()
        self.first = self.first or now
        self.last = now
        self.tokens += 1

    def read(self) -> tuple[float, float]:
        """(prefill ms, ms per later decode step)."""
        if self.tokens < 2:
            raise RuntimeError(f"the generation reported {self.tokens} tokens; decode timing needs 2 or more")
        return self.clock.ms(self.begin, self.first), self.clock.ms(self.first, self.last) / (self.tokens - 1)


class ClockStreamer:
    """transformers' streamer protocol feeding a StepClock (its first put is the prompt)."""

    def __init__(self, clock: StepClock):
        self.clock, self.prompt_seen = clock, False

    def put(self, value):
        if self.prompt_seen:
            self.clock.on_token()
        self.prompt_seen = True

    def end(self):
        pass


def measure(generate, device, new_tokens: int, warmup: int, repeats: int) -> dict:
    """Prefill and per-token decode time from inside each generation (its first and last token marks), after
    `warmup` untimed generations of the same shape (every bucket and compilation warmed); medians with min..max
    over `repeats`. generate(n, clock) runs one generation of n new tokens, reporting each token to the clock
    (None: untimed)."""
    for _ in range(warmup):
        generate(new_tokens, None)
    prefill, per_token, total = [], [], []
    for _ in range(repeats):
        clock = StepClock(device)
        clock.start()
        generate(new_tokens, clock)
        first, step = clock.read()
        prefill.append(first)
        per_token.append(step)
        total.append(first + step * (clock.tokens - 1))
    return dict(prefill_ms=statistics.median(prefill), prefill_min=min(prefill), prefill_max=max(prefill),
                ms_per_token=statistics.median(per_token), ms_per_token_min=min(per_token),
                ms_per_token_max=max(per_token), total_ms=statistics.median(total), repeats=repeats)


def transformers_baseline(lm, device, dtype):
    """transformers' GPT2LMHeadModel holding the same weights (its original head)."""
    from transformers import GPT2LMHeadModel

    from mexit.model.checkpoint import state_dict_from_weights

    hf = GPT2LMHeadModel(lm.config.to_hf())
    state = state_dict_from_weights(lm.model.w, lm.config)
    hf.load_state_dict({k: v for k, v in state.items() if not k.startswith("name_to_lm_exit_head")}, strict=False)
    hf.tie_weights()
    return hf.to(device=device, dtype=dtype).eval()


class LatencyBench:
    """A benchmark prepared once per process (or Ray worker): the model, the validated modes, the run's metadata
    and the measured memory bandwidth. `cases()` lists (prompt length, new tokens, batch); `case_rows(i)` measures
    case i: every mode and baseline, one after the other on this device."""

    def __init__(self, args):
        import mexit
        from mexit.decoding import modes as registry
        from mexit.decoding.early_exit import ExitPolicy
        from mexit.decoding.speculative import Speculation
        from mexit.frontends.cli import check_schedule
        from mexit.kernels.launch import pdl_supported
        from mexit.model.placement import resolve_device, resolve_dtype

        self.args = args
        device = resolve_device(args.device)
        set_threads(args.threads, device)
        if args.dtype == "auto" and not args.model:
            raise ValueError("--dtype auto keeps a checkpoint's stored dtype: it needs --model")
        dtype = args.dtype if args.dtype == "auto" else resolve_dtype(args.dtype, device)
        if args.model:
            lm = mexit.load(args.model, dtype=dtype, device=device, backend=args.backend, engine=args.engine,
                            compile=args.compile, check_weights=not args.no_weight_check, **hub_kwargs(args))
            self.label = str(args.model)
        else:
            lm = mexit.MultiExitLM.random(mexit.GPT2_MEDIUM_MULTIEXIT, dtype=dtype, device=device,
                                          backend=args.backend, engine=args.engine, compile=args.compile)
            self.label = "RANDOM weights, gpt2-medium-multiexit shape"
        dtype = lm.model.dtype  # "auto": the stored one
        if args.fused_max_rows is not None:
            if args.linear:
                raise ValueError("--fused-max-rows and --linear both choose the block linears: give one")
            if not lm.backend.triton:
                raise ValueError("--fused-max-rows needs the triton backend (the torch backend runs torch's matmuls)")
            lm.with_backend(fused_max_rows=args.fused_max_rows)
        if args.linear and not lm.backend.triton:
            raise ValueError(f"--linear {' '.join(args.linear)} needs the triton backend")
        self.linear_settings = args.linear or [None]
        self.lm = lm
        self.pdl_settings = {"off": [False], "on": [True], "both": [False, True]}[args.pdl]
        if any(self.pdl_settings) and not (lm.backend.triton and lm.engine != "eager" and pdl_supported(device)):
            raise ValueError(f"--pdl {args.pdl} needs the triton backend, the static or graph engine and a CUDA GPU "
                             "of compute capability 9.0 or newer")
        config = lm.config
        modes = args.modes or default_modes(config)
        twice = sorted({m for m in modes if modes.count(m) > 1})
        if twice:
            raise ValueError(f"--modes lists {twice} twice: each mode is one row per batch")
        self.controls = repetition_controls(args)
        self.parsed = {}
        for m in modes:
            settings = registry.parse(m, config)
            if not isinstance(settings, Speculation):
                self.parsed[m] = dict(mode=settings, **self.controls)
                continue
            for n in args.draft_vocab or [0]:  # 0: the full draft head
                spec = dataclasses.replace(settings.spec, draft_vocab=n or None)
                self.parsed[f"{m} vocab={n}" if n else m] = dict(mode=Speculation(spec, settings.target),
                                                                  **self.controls)
        if args.draft_vocab and not any(isinstance(kw["mode"], Speculation) for kw in self.parsed.values()):
            raise ValueError("--draft-vocab applies to speculative modes (spec:L:K[:T]); none was asked for")
        for name, kw in self.parsed.items():
            if isinstance(kw["mode"], ExitPolicy):
                check_schedule(kw["mode"].schedule, lm.engine, f"{name}: the {kw['mode'].schedule} schedule")
                kw["mode"].check_engine(lm.engine, lm.backend.name)
            registry.build(lm.model, kw["mode"])  # checked against the checkpoint (learned: its predictors)
        lengths = [(p, n) for p in args.prompt_len for n in args.new_tokens]
        for p, n in lengths:
            if p + n > config.n_positions:
                raise ValueError(f"prompt {p} + new tokens {n} exceed the context {config.n_positions}")
        self.run_meta = dict(run_metadata(device, dtype), model=self.label, random_weights=lm.is_random,
                             backend=lm.backend.name, engine=lm.engine, compiled=lm.compiles,
                             fused_max_rows=lm.backend.fused_max_rows if lm.backend.triton else None, **self.controls,
                             command=args.command)
        copy_only, read_only = copy_bandwidth_gbs(device), read_bandwidth_gbs(device)
        self.copy_gbs = max(copy_only, read_only)  # the roofline's bandwidth: the faster access pattern measured
        self.run_meta.update(copy_gb_s=copy_only, read_gb_s=read_only)

    def cases(self) -> list[tuple[int, int, int]]:
        return [(p, n, b) for (p, n), b in itertools.product(
            [(p, n) for p in self.args.prompt_len for n in self.args.new_tokens], self.args.batch)]

    def describe(self) -> str:
        m = self.run_meta
        return (f"# {self.label} on {m['device']}, {m['dtype']}, backend {self.lm.backend.name}, engine "
                f"{self.lm.engine}, memory bandwidth {self.copy_gbs:.0f} GB/s (copy {m['copy_gb_s']:.0f}, read "
                f"{m['read_gb_s']:.0f})")

    def case_rows(self, index: int) -> tuple[int, list[dict]]:
        """Case `index` measured: (index, its rows, each naming the process that timed it)."""
        import torch

        from mexit.frontends.cluster import where

        prompt_len, new_tokens, batch = self.cases()[index]
        case = copy.copy(self.args)
        case.prompt_len, case.new_tokens = prompt_len, new_tokens
        meta = dict(self.run_meta, prompt_len=prompt_len, new_tokens=new_tokens, worker=where())
        gen = torch.Generator().manual_seed(index)  # the case's prompts, wherever it runs
        return index, run_case(self.lm, self.parsed, batch, case, meta, self.copy_gbs, gen, self.pdl_settings,
                               self.linear_settings)


def repetition_controls(args) -> dict:
    """The repetition controls every row runs with (mexit's modes and the baselines' generate alike)."""
    controls = {}
    if args.repetition_penalty is not None:
        controls["repetition_penalty"] = args.repetition_penalty
    if args.no_repeat_ngram_size is not None:
        controls["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    return controls


def run(args) -> list[dict]:
    """Every case in this process, or each case a task on a Ray worker with --ray (its modes and baselines timed
    one after the other on that worker's device); rows in case order."""
    if args.ray:
        return run_on_ray(args)
    bench = LatencyBench(args)
    print(bench.describe(), file=sys.stderr)
    return [row for index in range(len(bench.cases())) for row in bench.case_rows(index)[1]]


def run_on_ray(args) -> list[dict]:
    from mexit.frontends.cluster import Workers, absolute, connect, worker_resources

    args.model = absolute(args.model)  # workers start in other folders
    cases = len(args.prompt_len) * len(args.new_tokens) * len(args.batch)
    connect(args.ray)
    count, options = worker_resources(args.device, args.threads or 1, cases)
    workers = Workers(LatencyBench, (args,), count, options)
    try:
        for line in sorted(set(workers.call_all("describe"))):
            print(line, file=sys.stderr)
        print(f"# {cases} case(s) across {count} Ray worker(s)", file=sys.stderr)
        done = dict(workers.map("case_rows", range(cases)))
    except KeyboardInterrupt:
        print("error: interrupted; no rows written", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        workers.close()
    return [row for index in range(cases) for row in done[index]]


def run_case(lm, parsed: dict, batch: int, args, meta: dict, copy_gbs: float, gen,
             pdl_settings=(False,), linear_settings=(None,)) -> list[dict]:
    """Every mode (on each block-linear path asked for, with programmatic dependent launch off and / or on, one
    after the other) and baseline at one batch size, prompt length and generation length."""
    import torch

    from mexit.decoding.early_exit import ExitPolicy
    from mexit.decoding.speculative import Speculation
    from mexit.ops import LINEAR_PATHS

    config, device, dtype = lm.config, lm.model.device, lm.model.dtype
    prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
    context = args.prompt_len + args.new_tokens // 2
    rows = []
    for (mode, kw), linear, pdl in itertools.product(parsed.items(), linear_settings, pdl_settings):
        lm.with_backend(pdl=pdl, **(LINEAR_PATHS[linear] if linear else {}))
        label = mode + (f" [{linear}]" if linear else "") + (" +pdl" if pdl else "")
        last = {}

        def generate(n, clock, kw=kw, last=last):
            out = lm.generate(prompts, n, eos_token_id=None, on_token=clock.on_token if clock else None, **kw)
            sync(device)
            last["result"] = out

        timing = measure(generate, device, args.new_tokens, args.warmup, args.repeats)
        stats = last["result"].stats
        traffic = mode_traffic(stats)
        weights, kv = step_bytes(config, dtype, batch, context, *traffic)
        row = timing_row(meta, "mexit", label, batch, timing, weights + kv, copy_gbs)
        triton = lm.backend.triton  # the row cut-offs choose among triton's kernels
        kernel = lm.backend.linear_kernel(batch) if triton else "cublas"
        if kernel == "cublas" and lm.model.device.type != "cuda":
            kernel = "torch"  # torch's matmul off CUDA: the CPU BLAS
        row.update(pdl=pdl, linear_path=linear or "default", linear=kernel,
                   gemv_max_rows=lm.backend.gemv_max_rows if triton else None,
                   fused_max_rows=lm.backend.fused_max_rows if triton else None,
                   n_layer=config.n_layer, **dict(zip(TRAFFIC, traffic)))
        counted = launches_per_step(lm, prompts, kw)
        row.update(launches_per_step=counted["launches"], triton_launches_per_step=counted["triton"],
                   torch_launches_per_step=counted["torch"], weight_bytes_per_step=weights, kv_bytes_per_step=kv)
        if isinstance(kw["mode"], ExitPolicy):
            row.update(mean_exit_layer=stats["mean_exit_layer"], weight_bytes_ratio=stats["weight_bytes_ratio"])
        if isinstance(kw["mode"], Speculation):  # launches_per_step: per generated token of a row
            row.update(acceptance_rate=stats["acceptance_rate"],
                       tokens_per_verification=stats["tokens_per_verification"],
                       weight_bytes_ratio=stats["weight_bytes_ratio"],
                       host_reads_per_round=stats["host_reads"] / max(stats["rounds"], 1))
        rows.append(row)
        print(f"  mexit {label} B={batch} P={args.prompt_len} N={args.new_tokens}: "
              f"{row.get('invalid') or format(row['ms_per_token'], '.3f') + ' ms/token'}", file=sys.stderr)
    if "transformers" in args.baselines:
        rows += transformers_rows(lm, prompts, device, dtype, args, meta, copy_gbs, context)
    if "autocontrastive-gen" in args.baselines:
        rows += autocontrastive_gen_rows(lm, prompts, device, dtype, args, meta, copy_gbs, context)
    return rows


def transformers_rows(lm, prompts, device, dtype, args, meta, copy_gbs, context) -> list[dict]:
    """transformers generate (eager), and with a static cache + torch.compile on CUDA."""

    hf = transformers_baseline(lm, device, dtype)
    controls = repetition_controls(args)
    variants = {"transformers eager": controls}
    if device.type == "cuda" and not args.no_compile:
        variants["transformers static+compile"] = dict(cache_implementation="static", **controls)
    n = lm.config.n_layer
    return [hf_generate_row(name, hf, "original", (n, 1), extra, prompts, device, dtype, args, meta, copy_gbs,
                            context, lm.config) for name, extra in variants.items()]


def autocontrastive_gen_rows(lm, prompts, device, dtype, args, meta, copy_gbs, context) -> list[dict]:
    """autocontrastive-gen's own MultiHeadGPT2 (full depth + every exit head each step) holding the same weights,
    running ACD between the top exit and the middle one, through its generate, as its users run it."""
    try:
        from autocontrastive_gen.modeling.configuration import MultiExitConfiguration as TheirConfig
        from autocontrastive_gen.modeling.gpt2_multi_head import MultiHeadGPT2
    except ImportError:
        return [dict(meta, impl="autocontrastive-gen", mode="acd", skipped=ACD_GEN_MISSING)]
    import transformers

    from mexit.model.checkpoint import state_dict_from_weights

    config = lm.config
    top = config.n_layer if config.n_layer in config.exit_layers else "original"
    middle = min(config.exit_layers, key=lambda e: abs(e - config.n_layer / 2))
    mode = f"acd:{top},{middle}"
    try:
        hf_config = config.to_hf()
        hf_config.output_hidden_states = True
        model = MultiHeadGPT2(hf_config, use_original_head=False, contrast_layer_indices=(top, middle),
                              contrast_function=TheirConfig().contrast_function, freeze_parameters=True)
        model.load_state_dict(state_dict_from_weights(lm.model.w, config), strict=False)
        model.tie_weights()
        model = model.to(device=device, dtype=dtype).eval()
        heads = len(config.exit_layers) + 1
        return [hf_generate_row("autocontrastive-gen", model, mode, (config.n_layer, heads), repetition_controls(args),
                                prompts, device,
                                dtype, args, meta, copy_gbs, context, config, reraise=True)]
    except Exception as err:  # say why, do not hide: e.g. its forward targets transformers 4.26
        reason = f"failed under transformers {transformers.__version__}: {err!r}"[:300]
        return [dict(meta, impl="autocontrastive-gen", mode=mode, skipped=reason)]


def hf_generate_row(name, model, mode, traffic, extra, prompts, device, dtype, args, meta, copy_gbs, context, config,
                    reraise=False) -> dict:
    """Time a transformers-style model's generate like mexit's rows (traffic = blocks, heads per step)."""
    import torch

    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def generate(n, clock):
        streamer = ClockStreamer(clock) if clock is not None else None
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, streamer=streamer, **extra)
        sync(device)

    try:
        timing = measure(generate, device, args.new_tokens, args.warmup, args.repeats)
    except Exception as err:
        if reraise:
            raise
        return dict(meta, impl=name, mode=mode, batch=len(prompts), skipped=f"failed: {err!r}"[:300])
    weights, kv = step_bytes(config, dtype, len(prompts), context, *traffic)
    row = timing_row(meta, name, mode, len(prompts), timing, weights + kv, copy_gbs)
    row.update(launches_per_step=hf_launches_per_step(model, ids, mask, extra), weight_bytes_per_step=weights,
               kv_bytes_per_step=kv)
    print(f"  {name} {mode} B={len(prompts)}: {row.get('invalid') or format(row['ms_per_token'], '.3f')}",
          file=sys.stderr)
    return row


def hf_launches_per_step(model, ids, mask, extra, steps: int = 3) -> float:
    """A transformers model's launches per decode step, counted like mexit's (uncompiled runs only: a compiled
    or graph-captured model dispatches nothing countable)."""
    import torch

    from mexit.ops.launches import count_launches, total

    if "cache_implementation" in extra:
        return None

    def run(n):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, **extra)

    with torch.inference_mode():
        with count_launches() as one:
            run(1)
        with count_launches() as many:
            run(steps + 1)
    return (total(many)["launches"] - total(one)["launches"]) / steps


COLUMNS = ["impl", "mode", "batch", "prompt_len", "new_tokens", "prefill_ms", "ms_per_token", "ms_per_token_min",
           "ms_per_token_max", "tokens_per_s", "floor_ms", "pct_roofline", "launches_per_step", "weight_bytes_per_step",
           "kv_bytes_per_step"]


def save(rows: list[dict], out_dir: str, plot: bool) -> list[Path]:
    out = Path(out_dir)
    paths = [write_results(rows, out, "latency")]
    keys = sorted({k for r in rows for k in r})
    with open(out / "latency.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    paths.append(out / "latency.csv")
    table = markdown_table([r for r in rows if "skipped" not in r and "invalid" not in r], COLUMNS)
    skipped = list(dict.fromkeys(f"- {r['impl']}: {r['skipped']}" for r in rows if "skipped" in r))
    skipped += [f"- {r['impl']} {r['mode']} batch {r['batch']}: INVALID, {r['invalid']}" for r in rows
                if "invalid" in r]
    r0 = rows[0]
    engine = r0["engine"] + (" (compiled)" if r0.get("compiled") else "")
    header = (f"{r0['model']} | {r0['device']} | {r0['dtype']} | backend {r0['backend']}, engine {engine} | "
              f"{r0['threads']} CPU threads, load {r0['load_avg_1m']} | commit {r0.get('commit')}\n\n"
              f"command: `{r0['command']}`\n\n")
    (out / "latency.md").write_text(header + table + ("\n\nSkipped:\n" + "\n".join(skipped) if skipped else "") + "\n")
    paths.append(out / "latency.md")
    plt = pyplot() if plot else None
    if plt is not None:
        paths.append(plot_rows(plt, rows, out / "latency.png"))
    return paths


def plot_rows(plt, rows: list[dict], path: Path) -> Path:
    timed = [r for r in rows if "skipped" not in r and "invalid" not in r]
    batches = sorted({r["batch"] for r in timed})
    labels = list(dict.fromkeys(f"{r['impl']} {r['mode']}" for r in timed))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(batches)), 4))
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        values = [next((r["ms_per_token"] for r in timed if r["batch"] == batch
                        and f"{r['impl']} {r['mode']}" == label), 0.0) for label in labels]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=f"batch {batch}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{timed[0]['model']}\n{timed[0]['device']}, {timed[0]['dtype']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


LINEARS = ["cublas", "tiled", "gemv"]  # mexit.ops.LINEAR_PATHS' names (that module imports torch: --help does not)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder or hub id (default: RANDOM gpt2-medium-multiexit shape)")
    add_load_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the static step's layers")
    p.add_argument("--fused-max-rows", type=int, help="triton backend: largest decode batch that runs the tiled "
                   "fused-linear blocks (default: the card's measured choice on CUDA, 64 elsewhere; 0 = cuBLAS)")
    p.add_argument("--linear", nargs="+", choices=LINEARS,
                   help="triton backend: time each mode on each of these block-linear paths (cuBLAS matmuls, the "
                   "tiled fused-linear kernel up to 64 rows, the loop-free GEMV up to 8 rows; default: the card's "
                   "measured choice, mexit/ops/routes.json)")
    p.add_argument("--pdl", default="off", choices=["off", "on", "both"],
                   help="programmatic dependent launch between the step's kernels (triton backend on Hopper or newer); "
                   "both: every mode with it off, then on, in the same run")
    p.add_argument("--modes", nargs="+", help="default: original, a middle exit, ACD top vs middle, early exit")
    p.add_argument("--draft-vocab", type=int, nargs="+", metavar="N",
                   help="speculative modes also (0: the full head) with the draft head restricted to the N most "
                        "frequent tokens (the checkpoint's token_counts.safetensors); rows 'spec:L:K vocab=N'")
    p.add_argument("--repetition-penalty", type=float, help="every row (the baselines too) with transformers' "
                   "repetition penalty")
    p.add_argument("--no-repeat-ngram-size", type=int, help="every row (the baselines too) with transformers' n-gram "
                   "ban")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 8 on cuda, 1 on cpu")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[32], help="prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, nargs="+", default=None, help="default: 128 on cuda, 8 on cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per measurement (default: 2 cuda, 1 cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default: 5 cuda, 2 cpu)")
    p.add_argument("--baselines", nargs="*", default=["transformers", "autocontrastive-gen"],
                   help="any of: transformers autocontrastive-gen (none: mexit only)")
    p.add_argument("--no-compile", action="store_true", help="skip transformers' static cache + torch.compile")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else 1 on CPU)")
    p.add_argument("--out", default="bench_results", help="output folder (JSON, CSV, markdown, PNG)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="each (prompt length, new tokens, batch) case a task on a Ray worker, one per GPU (per "
                        "--threads CPUs without GPUs); rows name the worker that timed them; 'auto' (the default "
                        "with --ray): the cluster this machine runs or a new local one; else a cluster address")


def redact_token(argv: list[str]) -> list[str]:
    """The command line as results record it: a --token's value (a hub access token) is never written."""
    out, hide = [], False
    for word in argv:
        out.append("***" if hide else "--token=***" if word.startswith("--token=") else word)
        hide = word == "--token"
    return out


def fill_defaults(args) -> None:
    import torch

    args.command = " ".join([INVOKED_AS.get(Path(sys.argv[0]).name, "python -m mexit.bench.latency"),
                             *redact_token(sys.argv[1:])])
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.batch = args.batch or ([1, 8] if cuda else [1])
    args.new_tokens = args.new_tokens or [128 if cuda else 8]
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (5 if cuda else 2)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if min(args.new_tokens) < 2:
        raise ValueError("--new-tokens must be >= 2 (decode time is measured from the first to the last token)")
    if min(args.batch) < 1 or min(args.prompt_len) < 1:
        raise ValueError("batch sizes and --prompt-len must be >= 1")
    from mexit.decoding.sampling import SamplingConfig

    SamplingConfig(**repetition_controls(args))  # bad values: a named error before anything loads
    unknown = set(args.baselines) - {"transformers", "autocontrastive-gen"}
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}")
    check_output_folder(args.out)  # before the run, not after it


def main_args(args) -> int:
    fill_defaults(args)
    rows = run(args)
    paths = save(rows, args.out, plot=not args.no_plot)
    print((Path(args.out) / "latency.md").read_text())
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def add_parser(sub) -> None:
    add_subcommand(sub, "bench", "latency benchmark (default: RANDOM-weight gpt2-medium-multiexit shape)",
                   add_arguments, main_args)


def main(argv=None) -> int:
    return script_main(__doc__, add_arguments, main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
