"""Seed and problem uncertainty (grouprl/stats.py) against numbers worked out by hand.

Student t quantiles in closed form: with 1 degree of freedom T is Cauchy, F(t) = 1/2 + atan(t)/pi, so
t_q = tan(pi (q - 1/2)); with 2, F(t) = 1/2 + t / (2 sqrt(t^2 + 2)), so t_q = c sqrt(2 / (1 - c^2)) with
c = 2q - 1, and the two-sided p of a statistic t is 1 - t / sqrt(t^2 + 2).
"""

import math

import numpy as np
import pytest

from grouprl.stats import Interval, bootstrap_accuracy, mean_interval, paired_bootstrap_accuracy, paired_t

T975_DF2 = 0.95 * math.sqrt(2 / (1 - 0.95**2))  # c = 0.95: sqrt(1.805 / 0.0975) = 4.302652729749464
T95_DF2 = 0.90 * math.sqrt(2 / (1 - 0.90**2))  # c = 0.90: sqrt(1.62 / 0.19) = 2.919985580353726
T975_DF1 = math.tan(0.475 * math.pi)  # 12.706204736174696


def close(x, y, tol=1e-9):
    return math.isclose(x, y, rel_tol=0, abs_tol=tol)


# ---------------------------------------------------------------- mean_interval


def test_mean_interval_three_seeds():
    # [1, 2, 3]: mean 2, deviations -1 0 1, var 2 / (3 - 1) = 1, sd 1, se 1 / sqrt(3)
    # half = 4.302652729749464 / sqrt(3) = 2.484137711750331
    ci = mean_interval([1, 2, 3])
    assert ci.n == 3 and close(ci.mean, 2)
    assert close(T975_DF2, 4.302652729749464, 1e-12)
    assert close(ci.half, 2.484137711750331) and close(ci.half, T975_DF2 / math.sqrt(3))
    assert close(ci.lo, 2 - 2.484137711750331) and close(ci.hi, 2 + 2.484137711750331)


def test_mean_interval_level_90():
    # same data, level 0.9: t_{0.95, 2} = 2.919985580353726, half = 2.91998... / sqrt(3) = 1.685854...
    ci = mean_interval([1, 2, 3], level=0.9)
    assert close(ci.half, T95_DF2 / math.sqrt(3))


def test_mean_interval_two_seeds():
    # [0, 2]: mean 1, var (1 + 1) / 1 = 2, sd sqrt(2), se sqrt(2) / sqrt(2) = 1; half = t_{0.975, 1} = 12.7062...
    ci = mean_interval([0, 2])
    assert close(ci.mean, 1) and close(ci.lo, 1 - T975_DF1) and close(ci.hi, 1 + T975_DF1)


def test_mean_interval_one_seed_has_no_interval():
    ci = mean_interval([0.7])
    assert ci.mean == 0.7 and ci.n == 1
    assert math.isnan(ci.lo) and math.isnan(ci.hi) and math.isnan(ci.half)


def test_mean_interval_equal_values_zero_width():
    # three 0.1s: numpy's std(ddof=1) is 1.7e-17, not 0; equal values must give a zero-width interval
    ci = mean_interval([0.1, 0.1, 0.1])
    assert ci.lo == ci.mean == ci.hi and ci.half == 0 and close(ci.mean, 0.1, 1e-15)


def test_mean_interval_cut_to_the_range_a_rate_can_take():
    # rates [0, 0, 0.06]: mean 0.02, sd 0.06 / sqrt(3) = 0.034641, se 0.02, half = 4.302653 * 0.02 = 0.086053;
    # the t interval [-0.066053, 0.106053] cut to [0, 1] is [0, 0.106053]
    ci = mean_interval([0, 0, 0.06], within=(0, 1))
    assert close(ci.mean, 0.02) and ci.lo == 0 and close(ci.hi, 0.02 + T975_DF2 * 0.02)
    assert close(mean_interval([0, 0, 0.06]).lo, 0.02 - T975_DF2 * 0.02)  # uncut without `within`
    top = mean_interval([1, 1, 0.94], within=(0, 1))  # mirrored: [0.893947, 1.066053] -> [0.893947, 1]
    assert top.hi == 1 and close(top.lo, 0.98 - T975_DF2 * 0.02)
    assert math.isnan(mean_interval([0.5], within=(0, 1)).lo)  # one seed: still no interval


def test_paired_t_cut_keeps_p_and_significance():
    # d = b - a = [0.5, 0.7, 0.9]: mean 0.7, sd 0.2, se 0.2 / sqrt(3) = 0.115470; half 0.496825 -> hi 1.196825
    a, b = [0.5, 0.3, 0.1], [1.0, 1.0, 1.0]
    cut, raw = paired_t(a, b, within=(-1, 1)), paired_t(a, b)
    assert cut.hi == 1 and close(raw.hi, 0.7 + T975_DF2 * 0.2 / math.sqrt(3))
    assert cut.lo == raw.lo and cut.p == raw.p and cut.significant and raw.significant


# ---------------------------------------------------------------- paired_t


def test_paired_t_not_significant():
    # d = b - a = [1, 2, 3]: the interval of test_mean_interval_three_seeds, [-0.484, 4.484], holds 0
    # t = 2 / (1 / sqrt(3)) = sqrt(12) = 3.4641; p = 1 - sqrt(12) / sqrt(14) = 1 - sqrt(6/7) = 0.0741799...
    r = paired_t([1, 2, 3], [2, 4, 6])
    assert r.n == 3 and close(r.diff, 2)
    assert close(r.lo, 2 - T975_DF2 / math.sqrt(3)) and close(r.hi, 2 + T975_DF2 / math.sqrt(3))
    assert close(r.p, 1 - math.sqrt(6 / 7)) and close(r.p, 0.07417990022744858)
    assert not r.significant


def test_paired_t_significant_both_directions():
    # d = [2, 3, 4]: mean 3, sd 1, t = 3 sqrt(3) = sqrt(27); p = 1 - sqrt(27/29) = 0.0350987 < 0.05
    # interval 3 -+ 2.484137711750331 = [0.515862..., 5.484137...] excludes 0
    r = paired_t([0, 0, 0], [2, 3, 4])
    assert close(r.diff, 3) and close(r.lo, 3 - 2.484137711750331) and close(r.p, 1 - math.sqrt(27 / 29))
    assert r.significant and r.p < 0.05
    # b worse than a: d = [-2, -3, -4], the mirror interval, the same p
    r = paired_t([2, 3, 4], [0, 0, 0])
    assert close(r.diff, -3) and close(r.hi, -3 + 2.484137711750331) and close(r.p, 1 - math.sqrt(27 / 29))
    assert r.significant


def test_paired_t_degenerate():
    # constant d = [1, 1, 1]: sd 0, interval [1, 1], t = 1 / 0 = inf, p = 0
    r = paired_t([1, 2, 3], [2, 3, 4])
    assert (r.diff, r.lo, r.hi, r.p) == (1, 1, 1, 0) and r.significant
    # identical arms: d = 0 with sd 0, t = 0 / 0 is undefined: p nan, interval [0, 0], not significant
    r = paired_t([0.4, 0.5, 0.6], [0.4, 0.5, 0.6])
    assert (r.diff, r.lo, r.hi) == (0, 0, 0) and math.isnan(r.p) and not r.significant
    # one seed: no interval and no test
    r = paired_t([0.4], [0.9])
    assert close(r.diff, 0.5) and math.isnan(r.lo) and math.isnan(r.p) and not r.significant and r.n == 1


# ---------------------------------------------------------------- bootstrap_accuracy


def test_bootstrap_accuracy_hand_worked():
    # seed accuracies 3/4 and 2/4: accuracy 5/8
    assert bootstrap_accuracy([[1, 0, 1, 1], [0, 0, 1, 1]]).mean == 0.625
    # one seed, [1, 0]: a replicate draws 2 problems, mean 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4; each tail
    # holds ~2500 of 10000 replicates, far beyond the 250 the 2.5% and 97.5% quantiles need: [0, 1] exactly
    assert bootstrap_accuracy([1, 0]) == Interval(0.5, 0.0, 1.0, 1)
    assert bootstrap_accuracy(np.ones((3, 50))) == Interval(1.0, 1.0, 1.0, 3)
    assert bootstrap_accuracy(np.zeros((3, 50))) == Interval(0.0, 0.0, 0.0, 3)


def test_bootstrap_accuracy_same_problems_for_every_seed():
    # two seeds right on complementary halves: every problem's seed mean is 0.5, so a replicate that takes
    # the same problems for both seeds is 0.5 exactly; resampling each seed on its own would spread it
    row = np.arange(40) % 2
    assert bootstrap_accuracy([row, 1 - row]) == Interval(0.5, 0.5, 0.5, 2)
    # four copies of one seed: the same replicates as the seed alone
    one, four = bootstrap_accuracy(row, seed=3), bootstrap_accuracy(np.tile(row, (4, 1)), seed=3)
    assert (one.mean, one.lo, one.hi) == (four.mean, four.lo, four.hi) and four.n == 4


def test_bootstrap_accuracy_matches_normal_approximation():
    # one seed, 600 right of 2000: a replicate's mean has variance p(1-p)/P = 0.21 / 2000, sd 0.0102470,
    # 95% half-width ~ 1.959964 * 0.0102470 = 0.0200837. Monte Carlo error of each 2.5%/97.5% endpoint with
    # R = 10000: sqrt(0.025 * 0.975 / R) / phi(1.96) = 0.0267 sd, so ~1% of the half-width; the binomial's
    # skewness 0.4 / sqrt(420) = 0.02 leaves the width unchanged to first order. 4% is ~4 Monte Carlo SEs.
    correct = np.r_[np.ones(600), np.zeros(1400)]
    ci = bootstrap_accuracy(correct)
    sd = math.sqrt(0.3 * 0.7 / 2000)
    assert ci.mean == 0.3
    assert abs(ci.half / (1.959964 * sd) - 1) < 0.04
    assert abs((ci.lo + ci.hi) / 2 - 0.3) < 0.1 * sd  # centre: Monte Carlo SE 0.02 sd, skew shift 0.01 sd


def test_bootstrap_accuracy_deterministic():
    correct = np.random.default_rng(1).integers(0, 2, (3, 100))
    assert bootstrap_accuracy(correct, seed=5) == bootstrap_accuracy(correct, seed=5)
    assert bootstrap_accuracy(correct, seed=5) != bootstrap_accuracy(correct, seed=6)


# ---------------------------------------------------------------- paired_bootstrap_accuracy


def test_paired_bootstrap_identical_arms():
    # every replicate difference is 0: interval [0, 0]; k = R, p = 2 (R + 1) / (R + 1) clipped to 1
    a = np.random.default_rng(2).integers(0, 2, (3, 60))
    r = paired_bootstrap_accuracy(a, a.copy())
    assert (r.diff, r.lo, r.hi, r.p, r.n) == (0, 0, 0, 1, 3) and not r.significant


def test_paired_bootstrap_all_right_against_none():
    # every replicate difference is 1: interval [1, 1]; k = #{d <= 0} = 0, p = 2 (0 + 1) / (10000 + 1)
    r = paired_bootstrap_accuracy(np.zeros((3, 30)), np.ones((3, 30)))
    assert (r.diff, r.lo, r.hi, r.n) == (1, 1, 1, 3) and close(r.p, 2 / 10001, 1e-15) and r.significant
    r = paired_bootstrap_accuracy(np.ones((3, 30)), np.zeros((3, 30)))
    assert (r.diff, r.lo, r.hi) == (-1, -1, -1) and r.significant


def test_paired_bootstrap_resamples_seeds():
    # b right everywhere with seed 0 and nowhere with seed 1, a right nowhere: diff 0.5 on every problem of
    # the seed-average, so problems alone give [0.5, 0.5]. Resampling the 2 seeds: both seed 0 (1/4) -> 1,
    # one of each (1/2) -> 0.5, both seed 1 (1/4) -> 0; each tail ~2500 replicates: [0, 1] exactly.
    # p = 2 (#{d <= 0} + 1) / (R + 1) ~ 2 * 1/4 = 0.5; SE of 2 * count / R is 2 sqrt(.25 .75 / R) = 0.0087.
    b = np.r_[[np.ones(50)], [np.zeros(50)]]
    a = np.zeros((2, 50))
    assert bootstrap_accuracy(b) == Interval(0.5, 0.5, 0.5, 2)
    r = paired_bootstrap_accuracy(a, b)
    assert (r.diff, r.lo, r.hi, r.n) == (0.5, 0, 1, 2) and abs(r.p - 0.5) < 0.035 and not r.significant


def test_paired_bootstrap_one_seed_resamples_problems_only():
    # one seed and a right nowhere: b - a = b, so the replicates are bootstrap_accuracy(b)'s, draw for draw
    b = np.random.default_rng(3).integers(0, 2, 80)
    r, ci = paired_bootstrap_accuracy(np.zeros(80), b, seed=4), bootstrap_accuracy(b, seed=4)
    assert (r.diff, r.lo, r.hi, r.n) == (ci.mean, ci.lo, ci.hi, 1)


def test_paired_bootstrap_clear_gain_and_determinism():
    # 3 seeds on 400 problems, a right on 30% and b on 60% (different problems per seed): diff 0.3 with a
    # problem-level sd of about sqrt((.21 + .24) / 400) = 0.034, so the interval sits far from 0
    rng = np.random.default_rng(5)
    a, b = (rng.random((3, 400)) < 0.3), (rng.random((3, 400)) < 0.6)
    r = paired_bootstrap_accuracy(a, b)
    assert close(r.diff, b.mean() - a.mean(), 1e-15) and 0 < r.lo < r.diff < r.hi
    assert r.significant and close(r.p, 2 / 10001, 1e-15)
    assert r == paired_bootstrap_accuracy(a, b) and r != paired_bootstrap_accuracy(a, b, seed=1)


# ---------------------------------------------------------------- input validation


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"same shape .* got \(2,\) and \(3,\)"):
        paired_t([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"same \(seeds, problems\) shape, got \(3, 10\) and \(3, 11\)"):
        paired_bootstrap_accuracy(np.zeros((3, 10)), np.zeros((3, 11)))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        mean_interval([])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        mean_interval([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"correct must be a non-empty \(seeds, problems\) array"):
        bootstrap_accuracy(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\), got 95"):
        mean_interval([1, 2, 3], level=95)
    with pytest.raises(ValueError, match="resamples must be at least 1"):
        bootstrap_accuracy([1, 0], resamples=0)
