"""Uncertainty across seeds and held-out problems for `grouprl compare --seeds`: pure numpy/scipy functions.

Each arm is trained once per seed and every run is evaluated on the same P held-out problems, in the same
order: a 0/1 matrix correct (n seeds, P). Accuracy = the mean over seeds of each seed's accuracy = correct.mean().

    mean_interval       x_bar +- t_{(1+level)/2, n-1} * sd / sqrt(n), sd with ddof=1 (Student t across seeds)
    paired_t            the same interval on d_s = b_s - a_s; p = 2 * P(T_{n-1} >= |d_bar| / (sd_d / sqrt(n)))
    bootstrap_accuracy  percentile interval of the accuracy when problems are resampled with replacement, the
                        same problems for every seed of a replicate (Efron & Tibshirani 1993, ch. 13)
    paired_bootstrap_accuracy
                        percentile interval of acc(b) - acc(a) when each replicate resamples seeds (rows) and
                        problems (columns), the same for a and b: a two-stage hierarchical bootstrap (Davison &
                        Hinkley 1997, sec. 3.8); p = min(1, 2 (k + 1) / (R + 1)), k = min(#{d* <= 0}, #{d* >= 0})
                        over R replicates. With few seeds the seed stage has few distinct resamples (10 for 3) and
                        can be too narrow: report.py sets a paired t over the seeds' accuracies beside it.

One seed gives no t interval: lo = hi = nan, p = nan, never significant. A t interval knows nothing of the range
a figure can take: `within=(low, high)` cuts it there (a rate to [0, 1], a difference of rates to [-1, 1]), so
a rate near 0 over three seeds reads [0, hi] rather than a negative bound; the mean and p are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence interval [lo, hi] from n seeds (runs); lo = hi = nan when n = 1."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        """(hi - lo) / 2: the +- of a t interval not cut by `within`; a bootstrap percentile interval need not be
        symmetric."""
        return (self.hi - self.lo) / 2


@dataclass(frozen=True)
class Paired:
    """Arm b against arm a on the same n seeds: diff = b - a, its interval [lo, hi], a two-sided p-value."""

    diff: float
    lo: float
    hi: float
    p: float
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (for paired_t the same as p < 1 - level); False when it is nan."""
        return self.lo > 0 or self.hi < 0


def _check(level: float, resamples: int = 1) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean of x (n,), n >= 2, and its standard error sd / sqrt(n), sd with ddof=1."""
    # equal values have sd 0 exactly; floating-point summation would leave ~1e-17 (three 0.1s)
    sd = 0.0 if np.ptp(x) == 0 else float(x.std(ddof=1))
    return float(x.mean()), sd / np.sqrt(x.size)


def _cut(lo: float, hi: float, within: tuple[float, float] | None) -> tuple[float, float]:
    """[lo, hi] cut to the range `within` (nan stays nan)."""
    if within is None or lo != lo:
        return lo, hi
    return max(lo, within[0]), min(hi, within[1])


def mean_interval(values, level: float = 0.95, within: tuple[float, float] | None = None) -> Interval:
    """Mean of values (n,) across seeds and its Student t interval, cut to `within`; lo = hi = nan when n = 1."""
    _check(level)
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence (one value per seed), got shape {x.shape}")
    if x.size == 1:
        return Interval(float(x[0]), np.nan, np.nan, 1)
    mean, se = _mean_se(x)
    half = stats.t.ppf((1 + level) / 2, x.size - 1) * se
    return Interval(mean, *_cut(mean - half, mean + half, within), x.size)


def paired_t(a, b, level: float = 0.95, within: tuple[float, float] | None = None) -> Paired:
    """Paired t-test of b against a, both (n,) per-seed scores on the same seeds: d = b - a; the interval cut to
    `within` (the range d can take), p from the t statistic as it is."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"paired_t needs a and b of the same shape (one score per seed), "
                         f"got {np.shape(a)} and {np.shape(b)}")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    ci = mean_interval(d, level, within)
    if ci.n == 1:
        return Paired(ci.mean, ci.lo, ci.hi, np.nan, 1)
    mean, se = _mean_se(d)
    with np.errstate(divide="ignore", invalid="ignore"):  # se = 0: t = +-inf (p = 0), or nan when mean = 0 too
        t = np.float64(mean) / se
    return Paired(mean, ci.lo, ci.hi, float(2 * stats.t.sf(abs(t), ci.n - 1)), ci.n)


def _runs(correct, name: str) -> np.ndarray:
    """correct as a float (seeds, problems) array; a 1-D vector is one seed."""
    x = np.atleast_2d(np.asarray(correct, dtype=float))
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty (seeds, problems) array, got shape {np.shape(correct)}")
    return x


def _bootstrap(x: np.ndarray, resamples: int, seed: int, seeds_too: bool) -> np.ndarray:
    """(resamples,) means of x (n, P) with its problems resampled, the same columns for every row of a
    replicate; its rows too when seeds_too and n > 1."""
    rng = np.random.default_rng(seed)
    n, P = x.shape
    out = np.empty(resamples)
    for start in range(0, resamples, 1000):  # blocks of 1000 replicates bound memory to 1000 * n * P values
        r = min(1000, resamples - start)
        cols = rng.integers(0, P, (r, P))  # resampled problem indices
        if seeds_too and n > 1:
            per_problem = x[rng.integers(0, n, (r, n))].mean(1)  # (r, P): mean over the resampled seeds
            out[start:start + r] = np.take_along_axis(per_problem, cols, 1).mean(1)
        else:
            out[start:start + r] = x.mean(0)[cols].mean(1)
    return out


def bootstrap_accuracy(correct, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Interval:
    """Mean accuracy of correct (seeds, problems) and its percentile interval over resampled problems."""
    _check(level, resamples)
    x = _runs(correct, "correct")
    lo, hi = np.quantile(_bootstrap(x, resamples, seed, seeds_too=False), [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(x.mean()), float(lo), float(hi), x.shape[0])


def paired_bootstrap_accuracy(correct_a, correct_b, level: float = 0.95, resamples: int = 10_000,
                              seed: int = 0) -> Paired:
    """acc(b) - acc(a), (seeds, problems) each on the same seeds and problems, by the hierarchical bootstrap."""
    _check(level, resamples)
    a, b = _runs(correct_a, "correct_a"), _runs(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must have the same (seeds, problems) shape, "
                         f"got {a.shape} and {b.shape}")
    d = _bootstrap(b - a, resamples, seed, seeds_too=True)  # (R,) replicates of acc(b) - acc(a)
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    k = int(min((d <= 0).sum(), (d >= 0).sum()))
    p = min(1.0, 2 * (k + 1) / (resamples + 1))  # the +1s keep a Monte Carlo p above 0 (Davison & Hinkley 4.11)
    return Paired(float(b.mean() - a.mean()), float(lo), float(hi), p, a.shape[0])
