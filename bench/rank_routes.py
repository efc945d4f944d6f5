"""A card's default block-linear path and PDL setting from its end-to-end measurements: reads `mexit bench` rows
(latency.json files of one card, run with `--linear` and `--pdl both`) and writes the card's entry for
`mexit/ops/routes.json` (the defaults a CUDA user gets follow it: `mexit.ops.routes`).

Rule: per batch size measured, the fastest of the paths timed for the original head (ms/token, medians); the GEMV
path becomes the default up to 8 rows only where it beat cuBLAS at every measured batch <= 8, the tiled kernel up
to the largest measured batch where it beat cuBLAS and at every smaller measured batch the GEMV does not take; PDL
on only
where the fastest path was faster with it. A path not timed is never chosen.

    python -m mexit.bench.rank_routes results/e2e_b1/latency.json results/e2e_b64/latency.json --out routes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def best_times(rows: list[dict], mode: str = "original") -> dict[int, dict[tuple[str, bool], float]]:
    """{batch: {(linear path, pdl): ms per token}} of `mode`'s mexit rows."""
    out: dict[int, dict[tuple[str, bool], float]] = {}
    for r in rows:
        if r.get("impl") != "mexit" or not str(r.get("mode", "")).startswith(mode) or "ms_per_token" not in r:
            continue
        if r.get("invalid") or "linear_path" not in r:
            continue
        key = (r["linear_path"], bool(r.get("pdl")))
        times = out.setdefault(r["batch"], {})
        times[key] = min(times.get(key, float("inf")), r["ms_per_token"])
    return out


def rank(rows: list[dict], card: str) -> dict:
    """The routes.json entry of `card` ({"fused_max_rows", "gemv_max_rows", "pdl", "measured"}) from its rows."""
    times = best_times(rows)
    if not times:
        raise ValueError("no mexit rows of the original head with a linear path: run mexit bench with --linear")
    gemv_max, fused_max, pdl_votes, notes = 0, 0, [], []
    small = sorted(b for b in times if b <= 8)
    if small and all(_faster(times[b], "gemv", "cublas") for b in small):
        gemv_max = 8
    for b in sorted(b for b in times if b > gemv_max):  # batches the GEMV takes never reach the tiled kernel
        if _faster(times[b], "tiled", "cublas") and (b > 8 or not gemv_max or _faster(times[b], "tiled", "gemv")):
            fused_max = b
        else:
            break
    for b in sorted(times):
        path = "gemv" if b <= gemv_max else "tiled" if b <= fused_max else "cublas"
        off, on = times[b].get((path, False)), times[b].get((path, True))
        if off and on:
            pdl_votes.append(on < off)
        notes.append(f"batch {b}: " + ", ".join(f"{p}{' +pdl' if q else ''} {t:.3f}" for (p, q), t in
                                                sorted(times[b].items(), key=lambda kv: kv[1])) + " ms/token")
    return dict(fused_max_rows=fused_max, gemv_max_rows=gemv_max, pdl=bool(pdl_votes) and all(pdl_votes),
                measured=f"{card}, mexit bench original head, {_engine(rows)} engine: " + "; ".join(notes))


def _engine(rows: list[dict]) -> str:
    return next((r["engine"] for r in rows if r.get("engine")), "unknown")


def _faster(times: dict, a: str, b: str) -> bool:
    best = {p: min((t for (q, _), t in times.items() if q == p), default=None) for p in (a, b)}
    return best[a] is not None and best[b] is not None and best[a] < best[b]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="latency.json files of one card")
    p.add_argument("--card", help="the card's name (default: the rows' device)")
    p.add_argument("--out", help="write {card: entry} here (default: print)")
    args = p.parse_args(argv)
    rows = [r for f in args.files for r in json.loads(Path(f).read_text())]
    card = args.card or next((r["device"] for r in rows if r.get("device")), "unknown")
    entry = {card: rank(rows, card)}
    text = json.dumps(entry, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
