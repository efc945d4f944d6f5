"""Where a decode step's time goes inside the captured CUDA graph: torch.profiler's CUDA activity around a
generation on the graph engine, each step's kernels (and the gaps between them) separated by a marker kernel that
the token callback queues between steps. Per kernel name: launches per step, mean and total microseconds per
step, share of the step; the gaps' mean, p90 and total; kernels + gaps add up to the step's device span (the time
between steps, host work of the loop, is reported apart). Run per block-linear path and PDL setting, so the
breakdowns of old and new kernels sit side by side.

    python -m mexit.bench.graph_breakdown --batch 1 64 --linear cublas tiled gemv --pdl both --out results

If the profiler sees no kernel inside the graph replays (CUPTI without graph-node records), the same step runs on
the static engine (the same kernels launched one by one, with eager launch gaps) and the table says so.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

MARKER = "spin_kernel"  # torch.cuda._sleep's kernel: queued by the token callback between steps


def analyze(events: list[tuple[str, float, float]], skip_steps: int = 2) -> dict:
    """events: (kernel name, start us, end us) of one generation in stream order, markers between steps. Returns
    {"steps", "step_us", "kernels_us", "gaps_us", "between_steps_us", "per_kernel": [{name, per_step, mean_us,
    total_us, share}], "gap_mean_us", "gap_p90_us"} over the steps after the first `skip_steps` (the region before
    the first marker is the prompt's and is not a step)."""
    events = sorted(events, key=lambda e: e[1])
    regions, current, marks = [], None, []
    for name, start, end in events:
        if MARKER in name:
            marks.append((start, end))
            if current is not None:
                regions.append(current)
            current = []
        elif current is not None:
            current.append((name, start, end))
    steps = [r for r in regions[skip_steps:] if r]
    if not steps:
        return {"steps": 0}
    per_name, gaps, spans, between = {}, [], [], []
    for region in steps:
        spans.append(region[-1][2] - region[0][1])
        gaps += [b[1] - a[2] for a, b in zip(region, region[1:])]
        for name, start, end in region:
            per_name.setdefault(name, []).append(end - start)
    for (_, mark_end), next_mark in zip(marks, marks[1:]):
        inside = [e for e in events if mark_end <= e[1] < next_mark[0] and MARKER not in e[0]]
        if inside:
            between.append(inside[0][1] - mark_end + next_mark[0] - inside[-1][2])
    n = len(steps)
    step_us = sum(spans) / n
    rows = [dict(name=name, per_step=len(times) / n, mean_us=statistics.fmean(times), total_us=sum(times) / n,
                 share=sum(times) / n / step_us) for name, times in per_name.items()]
    rows.sort(key=lambda r: -r["total_us"])
    gaps_sorted = sorted(gaps)
    return dict(steps=n, step_us=step_us, kernels_us=sum(r["total_us"] for r in rows), gaps_us=sum(gaps) / n,
                between_steps_us=statistics.fmean(between) if between else None, per_kernel=rows,
                launches_per_step=sum(r["per_step"] for r in rows),
                gap_mean_us=statistics.fmean(gaps) if gaps else 0.0,
                gap_p90_us=gaps_sorted[int(0.9 * (len(gaps_sorted) - 1))] if gaps else 0.0)


def table(label: str, result: dict) -> str:
    if not result.get("steps"):
        return f"### {label}\n\nno kernel between the step markers (nothing to break down)\n"
    lines = [f"### {label}", "",
             f"step {result['step_us']:.1f} us on the device = kernels {result['kernels_us']:.1f} + gaps "
             f"{result['gaps_us']:.1f} (mean {result['gap_mean_us']:.2f}, p90 {result['gap_p90_us']:.2f} us); "
             f"{result['launches_per_step']:.1f} launches per step over {result['steps']} steps; between steps "
             f"(host) {result['between_steps_us'] or 0:.1f} us", "",
             "| kernel | per step | mean us | us per step | share of step |", "|---|---|---|---|---|"]
    for r in result["per_kernel"]:
        name = r["name"] if len(r["name"]) <= 60 else r["name"][:57] + "..."
        lines.append(f"| `{name}` | {r['per_step']:g} | {r['mean_us']:.2f} | {r['total_us']:.1f} | "
                     f"{100 * r['share']:.1f}% |")
    return "\n".join(lines) + "\n"


def profile(run, cuda: bool = True) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every CUDA kernel of one generation `run(on_token)`, a marker kernel queued
    after each token; a first generation outside the trace builds and captures the steps. cuda=False (the CPU dry
    run): the CPU ops, a marker range after each token."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    def mark(*_):
        if cuda:
            torch.cuda._sleep(1)
        else:
            with record_function(MARKER):
                pass

    run(mark)
    if cuda:
        torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run(mark)
        if cuda:
            torch.cuda.synchronize()
    kind = "CUDA" if cuda else "CPU"
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if str(e.device_type).endswith(kind)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--linear", nargs="+", default=["cublas", "gemv"], choices=["cublas", "tiled", "gemv"])
    p.add_argument("--pdl", default="off", choices=["off", "on", "both"])
    p.add_argument("--modes", nargs="+", default=["original"], help="mexit bench's mode syntax")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="CPU dry run under TRITON_INTERPRET=1: the shipped small "
                   "model on the static engine, CPU ops profiled (no measurement)")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    import torch

    import mexit
    from mexit.decoding import modes
    from mexit.ops import LINEAR_PATHS

    if args.smoke:
        lm = mexit.MultiExitLM.from_pretrained(Path(__file__).with_name("small_model"), device="cpu",
                                               backend="triton", engine="static")
    elif torch.cuda.is_available():
        lm = mexit.MultiExitLM.random(mexit.GPT2_MEDIUM_MULTIEXIT, device="cuda", backend="triton", engine="graph")
    else:
        print("error: graph_breakdown profiles a CUDA GPU's kernels (--smoke: the CPU dry run)", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    out, results, path = [], {}, Path(args.out)
    pdls = {"off": [False], "on": [True], "both": [False, True]}[args.pdl]
    for batch, mode, linear, pdl in itertools.product(args.batch, args.modes, args.linear, pdls):
        prompts = torch.randint(0, lm.config.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
        lm.with_backend(pdl=pdl, **LINEAR_PATHS[linear])
        kw = dict(mode=modes.parse(mode, lm.config))
        label = f"{mode}, batch {batch}, {linear}{' +pdl' if pdl else ''}"

        def run(on_token, prompts=prompts, kw=kw):
            lm.generate(prompts, args.new_tokens, eos_token_id=None, on_token=on_token, **kw)

        result = analyze(profile(run, cuda=not args.smoke))
        if not result.get("steps") and not args.smoke:  # no graph-node records: the kernels launched one by one
            lm.engine = "static"
            result = analyze(profile(run))
            label += " (static engine: the profiler saw no kernel inside graph replays)"
            lm.engine = "graph"
        results[label] = result
        out.append(table(label, result))
        print(out[-1], flush=True)
        path.mkdir(parents=True, exist_ok=True)  # written after every setting: a timeout keeps what was done
        (path / "graph_breakdown.json").write_text(json.dumps(results, indent=1))
        (path / "graph_breakdown.md").write_text("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
