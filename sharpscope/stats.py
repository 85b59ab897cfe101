"""Statistics for conclusions over seeds: summaries with standard errors, the difference
of two groups, and rank correlation with generalization.

A number measured on one seed is an anecdote: training seeds, direction draws and
example subsets each move it. These functions turn several measurements into a mean
with its standard error, compare two groups (Welch's t-test, which does not assume equal
variances, and a confidence interval for the difference), and rank-correlate a measure
with the generalization gap (Kendall's tau-b, as in Jiang et al. 2020 and Andriushchenko
et al. 2023, with a bootstrap confidence interval over the models).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _scipy

from .errors import SharpscopeError

# 95%: the convention for error bars and intervals in the literature we compare with.
CONFIDENCE = 0.95
# Bootstrap resamples for Kendall's tau's interval: the percentile interval's endpoints
# move by about 1% of its width between seeds at this count (Efron & Tibshirani 1993,
# Ch. 13, recommend at least 1,000 for percentile intervals).
BOOTSTRAP_RESAMPLES = 2000


def _values(values: Sequence[float], what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise SharpscopeError(f"{what}: no values")
    if not np.isfinite(a).all():
        raise SharpscopeError(f"{what}: the values must be finite numbers")
    return a


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and standard error of ``n`` values (the last two
    None for a single value: one seed has no spread)."""

    mean: float
    std: float | None
    stderr: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.4g}" + (f" ± {self.stderr:.2g}" if self.stderr is not None else "")


def summary(values: Sequence[float]) -> Summary:
    """:class:`Summary` of ``values``."""
    a = _values(values, "summary")
    if a.size == 1:
        return Summary(float(a[0]), None, None, 1)
    std = float(a.std(ddof=1))
    return Summary(float(a.mean()), std, std / math.sqrt(a.size), int(a.size))


@dataclass(frozen=True)
class Difference:
    """mean(b) - mean(a), its standard error, Welch's t statistic with its degrees of
    freedom and two-sided p-value, and a ``confidence`` interval for the difference."""

    difference: float
    stderr: float
    t: float
    df: float
    p: float
    low: float
    high: float
    confidence: float
    n_a: int
    n_b: int

    def to_dict(self) -> dict:
        return asdict(self)


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Welch's two-sample t-test of mean(b) - mean(a) (Welch 1947), with the
    Welch-Satterthwaite degrees of freedom and the t interval for the difference.

    Needs two values per group at least; two groups without spread (all values equal
    within each) have no test: refused.
    """
    x, y = _values(a, "group a"), _values(b, "group b")
    if x.size < 2 or y.size < 2:
        raise SharpscopeError("a two-sample test needs at least 2 values per group (seeds)")
    if not 0 < confidence < 1:
        raise SharpscopeError(f"confidence must lie in (0, 1), got {confidence}")
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    if se == 0:
        raise SharpscopeError("both groups have no spread at all: no test is possible")
    diff = float(y.mean() - x.mean())
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    t = diff / se
    p = float(2 * _scipy.t.sf(abs(t), df))
    half = float(_scipy.t.ppf(0.5 + confidence / 2, df)) * se
    return Difference(
        diff, se, t, float(df), p, diff - half, diff + half, confidence, x.size, y.size
    )


@dataclass(frozen=True)
class RankCorrelation:
    """Kendall's tau-b of (x, y), its two-sided p-value (scipy's), and a bootstrap
    percentile interval over the pairs."""

    tau: float
    p: float
    low: float
    high: float
    confidence: float
    n: int
    resamples: int

    def to_dict(self) -> dict:
        return asdict(self)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either variable corrected for, Kendall 1945):
    (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)), n0 = n (n - 1) / 2.
    O(n^2): meant for the tens to hundreds of models of a sweep."""
    a, b = _values(x, "x"), _values(y, "y")
    if a.size != b.size:
        raise SharpscopeError(f"x and y differ in length ({a.size} and {b.size})")
    i, j = np.triu_indices(a.size, k=1)
    sx, sy = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n0 = i.size
    ties_x, ties_y = int((sx == 0).sum()), int((sy == 0).sum())
    denominator = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    if denominator == 0:
        return math.nan  # one variable constant: no ranking to correlate
    return float((sx * sy).sum() / denominator)


def kendall(
    x: Sequence[float],
    y: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> RankCorrelation:
    """Kendall's tau-b between ``x`` (e.g. a sharpness measure) and ``y`` (e.g. the
    generalization gap) over models, with a percentile bootstrap interval: the models
    resampled with replacement ``resamples`` times (a local generator seeded with
    ``seed``). Needs 3 models at least."""
    a, b = _values(x, "x"), _values(y, "y")
    if a.size != b.size:
        raise SharpscopeError(f"x and y differ in length ({a.size} and {b.size})")
    if a.size < 3:
        raise SharpscopeError("a rank correlation needs at least 3 models")
    tau = kendall_tau_b(a, b)
    p = float(_scipy.kendalltau(a, b).pvalue) if math.isfinite(tau) else math.nan
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, a.size, a.size)
        value = kendall_tau_b(a[idx], b[idx])
        if math.isfinite(value):
            draws.append(value)
    if draws:
        low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    else:
        low = high = math.nan
    return RankCorrelation(tau, p, float(low), float(high), confidence, int(a.size), resamples)
