"""Markdown tables for bench/RESULTS.md from a pytest-benchmark JSON (`--benchmark-json`), one per group, so the
kernel tables are generated, not typed:

    python -m mexit.bench.benchmark_tables out.json [--out tables.md]

Each row: the test's parameters, the median and interquartile range of its rounds (us), the rounds, then the
suite's extra_info (bytes moved, GB/s, percent of the measured copy bandwidth, the floor at that bandwidth,
launches of one call; decode calls add ms per token). The heading names the device, dtype-free versions and the
commit of the run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mexit.bench.common import markdown_table

COLUMNS = ["median_us", "iqr_us", "rounds", "gb_s", "pct_copy", "floor_us", "launches", "ms_per_token", "prefill_ms"]


def tables(run: dict) -> str:
    """The markdown of one pytest-benchmark run."""
    info = run.get("machine_info", {}).get("mexit", {})
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "triton", "transformers") if info.get(k))
    lines = [f"{info.get('device', '?')}, copy bandwidth {info.get('copy_gbs', '?')} GB/s, {versions}, commit "
             f"{run.get('commit_info', {}).get('id', info.get('commit', '?'))[:10]}, {run.get('datetime', '')[:19]}"]
    groups: dict[str, list[dict]] = {}
    for bench in run["benchmarks"]:
        stats, extra = bench["stats"], bench.get("extra_info", {})
        row = {**{k: v for k, v in (bench.get("params") or {}).items()},
               "median_us": round(stats["median"] * 1e6, 2), "iqr_us": round(stats["iqr"] * 1e6, 2),
               "rounds": stats["rounds"], **{k: extra[k] for k in COLUMNS[3:] if k in extra}}
        if extra.get("cold") is False and "cache_state" not in row:
            row["cache"] = "warm"
        groups.setdefault(bench.get("group") or bench["name"], []).append(row)
    for group, rows in groups.items():
        columns = [c for c in rows[0] if c not in COLUMNS] + [c for c in COLUMNS if any(c in r for r in rows)]
        lines += ["", f"### {group}", "", markdown_table(rows, columns)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a pytest-benchmark JSON (--benchmark-json or a saved run)")
    p.add_argument("--out", help="write the tables to this file (default: print them)")
    args = p.parse_args(argv)
    try:
        run = json.loads(Path(args.run).read_text())
        text = tables(run)
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: {args.run} is not a pytest-benchmark JSON ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
