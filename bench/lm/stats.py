"""Seeds -> evidence: mean and t-interval of a metric, and the verdict on an ordering "A < B".

Pure functions on plain numbers (no I/O), so the rules the summary applies are unit-tested on
made-up values (python_tests/test_lm.py):

- `mean_ci(values)`: the mean and the two-sided `confidence` interval mean ± t·s/√n, with s the
  sample standard deviation and t Student's quantile with n − 1 degrees of freedom
  (no scipy: the t CDF is the regularised incomplete beta function, inverted by bisection).
- `compare(a, b)`: "held" when A's interval lies wholly below B's, "not held" when wholly above,
  "not resolved" when they overlap (or a side has < 2 values), with `seeds_needed`: the smallest
  per-variant n at which intervals of the observed spreads around the observed means would no
  longer overlap (None when the means are equal or it exceeds `max_seeds`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

HELD, NOT_HELD, NOT_RESOLVED = "held", "not held", "not resolved"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile: t_cdf(t_quantile(p, df), df) == p, 0 < p < 1, df > 0."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


class Interval(NamedTuple):
    n: int
    mean: float
    low: float   # nan when n < 2
    high: float
    sd: float    # sample standard deviation; nan when n < 2

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(values)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n < 2:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half, sd)


def seeds_needed(a: Interval, b: Interval, confidence: float = 0.95, max_seeds: int = 50) -> Optional[int]:
    """Smallest n (same for both sides) with t_{n-1}·(s_a + s_b)/√n < |mean_a − mean_b|: the
    seeds per variant at which the intervals stop overlapping if means and spreads hold.
    None when a side has < 2 values, the means are equal, or n would exceed max_seeds."""
    if a.n < 2 or b.n < 2:
        return None
    gap = abs(a.mean - b.mean)
    spread = a.sd + b.sd
    if gap == 0:
        return None
    for n in range(2, max_seeds + 1):
        if t_quantile(0.5 + confidence / 2.0, n - 1) * spread / math.sqrt(n) < gap:
            return n
    return None


class Verdict(NamedTuple):
    verdict: str           # HELD, NOT_HELD or NOT_RESOLVED
    a: Interval
    b: Interval
    seeds_needed: Optional[int]  # for NOT_RESOLVED: per-variant seeds that would resolve it
    reason: str


def compare(a_values: Sequence[float], b_values: Sequence[float], confidence: float = 0.95,
            max_seeds: int = 50) -> Verdict:
    """The ordering "A < B" (e.g. A's perplexity below B's), judged by non-overlapping intervals."""
    a, b = mean_ci(a_values, confidence), mean_ci(b_values, confidence)
    if a.n < 2 or b.n < 2:
        return Verdict(NOT_RESOLVED, a, b, None, f"needs >= 2 values a side (have {a.n}, {b.n})")
    if a.high < b.low:
        return Verdict(HELD, a, b, None, "A's interval wholly below B's")
    if a.low > b.high:
        return Verdict(NOT_HELD, a, b, None, "A's interval wholly above B's")
    needed = seeds_needed(a, b, confidence, max_seeds)
    if needed is None:
        reason = ("intervals overlap; equal means" if a.mean == b.mean
                  else f"intervals overlap; more than {max_seeds} seeds would be needed")
    else:
        direction = HELD if a.mean < b.mean else NOT_HELD
        reason = f"intervals overlap; about {needed} seeds per variant would resolve it (as {direction}, if the means hold)"
    return Verdict(NOT_RESOLVED, a, b, needed, reason)


def below(values: Sequence[float], threshold: float, confidence: float = 0.95) -> Verdict:
    """The goal "metric < threshold": held when the interval is wholly below it, not held when
    wholly above, else not resolved (a threshold is an interval of width 0)."""
    a = mean_ci(values, confidence)
    point = Interval(0, threshold, threshold, threshold, 0.0)
    if a.n < 2:
        return Verdict(NOT_RESOLVED, a, point, None, f"needs >= 2 values (have {a.n})")
    if a.high < threshold:
        return Verdict(HELD, a, point, None, "interval wholly below the threshold")
    if a.low > threshold:
        return Verdict(NOT_HELD, a, point, None, "interval wholly above the threshold")
    needed = seeds_needed(a, Interval(2, threshold, threshold, threshold, 0.0), confidence)
    return Verdict(NOT_RESOLVED, a, point, needed, "interval contains the threshold")
