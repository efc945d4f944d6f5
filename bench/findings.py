"""What an ablation found, with its uncertainty: confidence intervals on each setting's speed-up and quality, settings
that did identical work merged into one point, and the "worth using" front drawn only where differences exceed the
noise and a practical margin.

Speed-up: each setting is timed in pairs interleaved with the full-depth reference (same batch, alternating order);
its speed-up is the geometric mean of the pairs' ratios (reference time / setting time) with a 95% Student-t
interval on their logarithms. Quality: the full model's mean log-likelihood of each prompt's continuation and the
token agreement with full depth, per prompt; differences between two settings are paired over the prompts (t
interval on the mean difference). Two settings with the same tokens for every prompt and the same weight reads per
token did the same work: one point, their timing pairs pooled.

The front (Pareto with noise): a point is a candidate when its speed-up interval lies above 1 (faster than full depth
beyond the noise). Point B beats point A when B is not slower and not worse, and is faster or better, where each of
"faster", "slower", "better", "worse" means the interval of the difference lies beyond a margin (speed: a ratio of
1 +- speed_margin; quality: +- loglik_margin nats per token): differences inside the margin are ties, so settings a
hair apart do not swap in and out between runs. Candidates no other candidate beats are worth using."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field

from mexit.timing import mean_interval, ratio_interval, t975

SPEED_MARGIN = 0.03  # speed-ups within 3% of each other are ties
LOGLIK_MARGIN = 0.01  # log-likelihoods within 0.01 nats per token of each other are ties


def log_ratios(pairs: list[list[float]]) -> list[float]:
    """log(reference seconds / setting seconds) of timing pairs [[reference, setting], ...]."""
    return [math.log(ref / t) for ref, t in pairs]


def speedup_interval(pairs: list[list[float]]) -> dict:
    """A row's speed-up columns from its timing pairs."""
    speedup, lo, hi = ratio_interval(log_ratios(pairs))
    return dict(speedup=speedup, speedup_lo=lo, speedup_hi=hi, timed_pairs=len(pairs))


def tokens_digest(tokens: list[list[int]]) -> str:
    """One hash of every prompt's output tokens: equal digests, equal outputs."""
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


@dataclass
class Point:
    """Settings that did identical work (same tokens, same weight reads per token), as one point of the front."""

    rows: list[dict]
    log_ratios: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.rows[0]["label"] if len(self.rows) == 1 else " = ".join(r["label"] for r in self.rows)

    @property
    def quality(self) -> list[float]:
        return self.rows[0]["loglik_per_prompt"]

    def interval(self) -> tuple[float, float, float]:
        """(speed-up, low, high) of the pooled pairs."""
        return ratio_interval(self.log_ratios)

    def speed(self) -> tuple[float, float, float]:
        """(log speed-up, its standard error, its degrees of freedom)."""
        n = len(self.log_ratios)
        m = statistics.fmean(self.log_ratios)
        return m, (statistics.stdev(self.log_ratios) / math.sqrt(n) if n > 1 else 0.0), n - 1


def same_work(row: dict) -> tuple:
    """What two rows must share to have done identical work: every output token and the weight reads per token."""
    from mexit.bench.common import TRAFFIC

    return (row["tokens_digest"], round(row["weight_bytes_ratio"], 9), *(round(row[k], 9) for k in TRAFFIC))


def points(settings: list[dict]) -> list[Point]:
    """The settings' rows grouped by identical work, their timing pairs pooled."""
    groups: dict[tuple, Point] = {}
    for row in settings:
        point = groups.setdefault(same_work(row), Point([]))
        point.rows.append(row)
        point.log_ratios += log_ratios(row["pairs"])
    return list(groups.values())


def faster(b: Point, a: Point, margin: float = SPEED_MARGIN) -> int:
    """+1: b is faster than a beyond the noise and the margin; -1: slower; 0: a tie."""
    (mb, sb, db), (ma, sa, da) = b.speed(), a.speed()
    df = min(db, da)
    if df < 1:
        return 0
    half = t975(df) * math.hypot(sb, sa)
    d, band = mb - ma, math.log1p(margin)
    return 1 if d - half > band else -1 if d + half < -band else 0


def better(b: Point, a: Point, margin: float = LOGLIK_MARGIN) -> int:
    """+1: b's log-likelihood is higher than a's beyond the noise (paired over prompts) and the margin; -1: lower;
    0: a tie."""
    m, lo, hi = mean_interval([x - y for x, y in zip(b.quality, a.quality)])
    return 1 if lo > margin else -1 if hi < -margin else 0


def beats(b: Point, a: Point, speed_margin: float, loglik_margin: float) -> bool:
    s, q = faster(b, a, speed_margin), better(b, a, loglik_margin)
    return s >= 0 and q >= 0 and (s > 0 or q > 0)


def mark_front(rows: list[dict], speed_margin: float = SPEED_MARGIN, loglik_margin: float = LOGLIK_MARGIN) -> list:
    """rows[0] is full depth, the rest the settings (each with pairs, loglik_per_prompt, tokens_digest and the
    weight reads). Marks every setting's row with `point` (its group's label, the same for identical work),
    `faster_than_full_depth` (speed-up interval above 1) and `worth_using`, and each its log-likelihood difference
    from full depth with its interval; returns the front's points, fastest first."""
    reference = rows[0]
    settings = rows[1:]
    for row in settings:
        m, lo, hi = mean_interval([x - y for x, y in zip(row["loglik_per_prompt"], reference["loglik_per_prompt"])])
        row.update(loglik_delta=m, loglik_delta_lo=lo, loglik_delta_hi=hi)
    groups = points(settings)
    candidates = []
    for point in groups:
        above = point.interval()[1] > 1
        for row in point.rows:
            row.update(point=point.label, faster_than_full_depth=above, worth_using=False)
        if above:
            candidates.append(point)
    front = [a for a in candidates if not any(beats(b, a, speed_margin, loglik_margin) for b in candidates
                                              if b is not a)]
    for point in front:
        for row in point.rows:
            row["worth_using"] = True
    reference.update(point="full depth", faster_than_full_depth=False, worth_using=False, loglik_delta=0.0,
                     loglik_delta_lo=0.0, loglik_delta_hi=0.0)
    return sorted(front, key=lambda p: -p.speed()[0])

