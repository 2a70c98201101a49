"""GRPO advantage estimators against numbers worked out by hand (DESIGN.md, "GRPO advantages").

Rewards are laid out group by group: with group_size G, entries 0..G-1 are prompt 0, G..2G-1 prompt 1, ...
"""

import math
from typing import get_args

import pytest
import torch
from torch.testing import assert_close

from grouprl.advantages import (
    ADVANTAGES,
    batch_std,
    group_mean,
    group_zscore,
    leave_one_out,
    rank,
    zero_std_groups,
)
from grouprl.config import AdvantageName

EPS = 1e-4  # the estimators' default eps


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- group_zscore


def test_zscore_hand_worked():
    # group [1, 0, 0, 1]: mean .5, deviations +-.5, sum of squares 4 * .25 = 1,
    # Bessel variance 1 / (4 - 1) = 1/3, std = sqrt(1/3) = 0.57735...; A = +-.5 / (sqrt(1/3) + 1e-4)
    # group [0, 1, 2]... is a different G; here the second group is [3, 3, 3, 3]: std 0 -> A = 0 / eps = 0
    adv = group_zscore(t([1, 0, 0, 1, 3, 3, 3, 3]), group_size=4)
    s = math.sqrt(1 / 3) + EPS
    assert_close(adv, t([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0]), atol=1e-12, rtol=0)


def test_zscore_eps_and_three_groups():
    # G = 3, group [0, 1, 2]: mean 1, deviations [-1, 0, 1], Bessel var (1 + 0 + 1) / 2 = 1, std 1
    # with eps = 0: A = [-1, 0, 1] exactly;
    # group [2, 2, 5]: mean 3, deviations [-1, -1, 2], var (1 + 1 + 4) / 2 = 3, std sqrt(3)
    # group [4, 0, 2]: mean 2, deviations [2, -2, 0], var (4 + 4) / 2 = 4, std 2 -> [1, -1, 0]
    adv = group_zscore(t([0, 1, 2, 2, 2, 5, 4, 0, 2]), group_size=3, eps=0.0)
    r3 = math.sqrt(3)
    assert_close(adv, t([-1, 0, 1, -1 / r3, -1 / r3, 2 / r3, 1, -1, 0]), atol=1e-12, rtol=0)


def test_zscore_float32():
    # the same [1, 0, 0, 1] in float32 keeps the dtype and is within float32 rounding of the exact value
    adv = group_zscore(t([1, 0, 0, 1], torch.float32), group_size=4)
    assert adv.dtype == torch.float32
    a = 0.5 / (math.sqrt(1 / 3) + EPS)  # 0.86588...
    assert_close(adv, t([a, -a, -a, a], torch.float32), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- group_mean (Dr. GRPO)


def test_group_mean_hand_worked():
    # [1, 0, 0, 1]: mean .5 -> [.5, -.5, -.5, .5]
    # [2, 4, 6, 8]: mean 5 -> [-3, -1, 1, 3]  (no std division: scale kept)
    adv = group_mean(t([1, 0, 0, 1, 2, 4, 6, 8]), group_size=4)
    assert_close(adv, t([0.5, -0.5, -0.5, 0.5, -3, -1, 1, 3]), atol=0, rtol=0)


# ---------------------------------------------------------------- leave_one_out (RLOO)


def test_rloo_hand_worked():
    # [1, 0, 0, 1]: A_0 = 1 - (0 + 0 + 1)/3 = 2/3;  A_1 = 0 - (1 + 0 + 1)/3 = -2/3; A_2 = -2/3; A_3 = 2/3
    # [2, 4, 6, 8]: A_0 = 2 - (4+6+8)/3 = 2 - 6 = -4;  A_1 = 4 - (2+6+8)/3 = 4 - 16/3 = -4/3
    #               A_2 = 6 - (2+4+8)/3 = 6 - 14/3 = 4/3;  A_3 = 8 - (2+4+6)/3 = 8 - 4 = 4
    adv = leave_one_out(t([1, 0, 0, 1, 2, 4, 6, 8]), group_size=4)
    expected = t([2 / 3, -2 / 3, -2 / 3, 2 / 3, -4, -4 / 3, 4 / 3, 4])
    assert_close(adv, expected, atol=1e-12, rtol=0)
    # identity: RLOO = G / (G - 1) * (r - mean)
    assert_close(adv, 4 / 3 * group_mean(t([1, 0, 0, 1, 2, 4, 6, 8]), 4), atol=1e-12, rtol=0)


def test_rloo_group_of_two():
    # G = 2, [3, 1]: A_0 = 3 - 1 = 2, A_1 = 1 - 3 = -2
    assert_close(leave_one_out(t([3, 1]), group_size=2), t([2, -2]), atol=0, rtol=0)


# ---------------------------------------------------------------- rank


def test_rank_distinct():
    # G = 4, [10, 30, 20, 40]: ranks from the lowest 1, 3, 2, 4; centre (G + 1)/2 = 2.5, half-range (G - 1)/2 = 1.5
    # A = (1 - 2.5)/1.5 = -1, (3 - 2.5)/1.5 = 1/3, (2 - 2.5)/1.5 = -1/3, (4 - 2.5)/1.5 = 1
    adv = rank(t([10, 30, 20, 40]), group_size=4)
    # (rank computes in float32 internally, so float64 input is exact only to float32 rounding)
    assert_close(adv, t([-1, 1 / 3, -1 / 3, 1]), atol=1e-6, rtol=0)


def test_rank_ties_share_mean_rank():
    # [0, 1, 1, 0]: the two 0s hold ranks 1 and 2 -> both 1.5; the two 1s hold 3 and 4 -> both 3.5
    # A = (1.5 - 2.5)/1.5 = -2/3, (3.5 - 2.5)/1.5 = 2/3
    # [5, 5, 5, 9]: the three 5s hold ranks 1, 2, 3 -> 2 each: (2 - 2.5)/1.5 = -1/3; 9 has rank 4 -> 1
    adv = rank(t([0, 1, 1, 0, 5, 5, 5, 9]), group_size=4)
    assert_close(adv, t([-2 / 3, 2 / 3, 2 / 3, -2 / 3, -1 / 3, -1 / 3, -1 / 3, 1]), atol=1e-6, rtol=0)


def test_rank_all_equal_is_zero():
    # [7, 7, 7, 7]: all share the mean rank (1+2+3+4)/4 = 2.5 = the centre -> A = 0
    adv = rank(t([7, 7, 7, 7, 0.5, 0.5, 0.5, 0.5]), group_size=4)
    assert_close(adv, torch.zeros(8, dtype=torch.float64), atol=0, rtol=0)


def test_rank_group_of_two_and_dtype():
    # G = 2: half-range (2 - 1)/2 = .5, centre 1.5: [0, 1] -> (1 - 1.5)/.5 = -1, (2 - 1.5)/.5 = 1
    adv = rank(t([0, 1, 1, 0], torch.float32), group_size=2)
    assert adv.dtype == torch.float32
    assert_close(adv, t([-1, 1, 1, -1], torch.float32), atol=0, rtol=0)


def test_rank_depends_only_on_order():
    r = t([0.3, -2.0, 5.0, 0.1, 9.0, 9.0])
    assert_close(rank(r, 3), rank(100 * r + 7, 3), atol=0, rtol=0)
    assert_close(rank(r, 3), rank(r.exp(), 3), atol=0, rtol=0)


# ---------------------------------------------------------------- batch_std (REINFORCE++)


def test_batch_std_hand_worked():
    # rewards [1, 0, 0, 1 | 1, 1, 1, 0], G = 4
    # group means .5 and .75 -> r - mean_group = [.5, -.5, -.5, .5 | .25, .25, .25, -.75]
    # batch: five 1s, three 0s, mean 5/8; sum of squares 5 * (3/8)^2 + 3 * (5/8)^2 = (45 + 75)/64 = 15/8
    # Bessel variance (15/8) / 7 = 15/56, std sqrt(15/56) = 0.51755...
    adv = batch_std(t([1, 0, 0, 1, 1, 1, 1, 0]), group_size=4)
    d = math.sqrt(15 / 56) + EPS
    expected = t([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]) / d
    assert_close(adv, expected, atol=1e-12, rtol=0)


def test_batch_std_keeps_relative_scale():
    # [0, 2 | 0, 1]: group deviations [-1, 1 | -.5, .5]; batch mean .75, squares .5625 + 1.5625 + .5625 + .0625
    # = 2.75, Bessel var 2.75/3, std sqrt(11/12); the second group's advantages stay half the first's
    adv = batch_std(t([0, 2, 0, 1]), group_size=2, eps=0.0)
    d = math.sqrt(11 / 12)
    assert_close(adv, t([-1, 1, -0.5, 0.5]) / d, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- zero_std_groups


def test_zero_std_groups():
    # [1, 1, 1] all equal -> True; [0, 1, 0] -> False; [2, 2, 2] -> True; [0.5, 0.5, 0.25] -> False
    r = t([1, 1, 1, 0, 1, 0, 2, 2, 2, 0.5, 0.5, 0.25])
    assert zero_std_groups(r, 3).tolist() == [True, False, True, False]
    assert zero_std_groups(t([0, 0, 0, 1]), 2).tolist() == [True, False]


# ---------------------------------------------------------------- all estimators


def test_registry_matches_config_names():
    assert set(ADVANTAGES) == set(get_args(AdvantageName))
    assert ADVANTAGES["zscore"] is group_zscore
    assert ADVANTAGES["mean"] is group_mean
    assert ADVANTAGES["rloo"] is leave_one_out
    assert ADVANTAGES["rank"] is rank
    assert ADVANTAGES["batch_std"] is batch_std


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_no_signal_from_all_equal_groups(name):
    # a group whose rewards are all equal gets A = 0 under every estimator; the other group is nonzero
    # and every estimator keeps a zero sum within each group here (symmetric rewards)
    r = t([2, 2, 2, 2, 1, 0, 0, 1])
    adv = ADVANTAGES[name](r, 4, EPS)
    assert adv.shape == (8,)
    assert_close(adv[:4], torch.zeros(4, dtype=torch.float64), atol=0, rtol=0)
    assert (adv[4:] != 0).all()
    assert adv[4:].sum().abs() < 1e-12
    # higher reward -> higher advantage
    assert adv[4] > adv[5] and adv[7] > adv[6]


# ---------------------------------------------------------------- flat groups in float32 are exactly 0


W = torch.tensor([0.2, 0.5, 2.0])  # reward-function weights; the total is per_fn @ W, as in rewards.py
# group 0: every function returns 1 -> r = 0.2 + 0.5 + 2.0 = 2.7 for all 8 (float32 2.70000005)
# group 1: rows [1, 0, 0] and [0, 0, 0] alternate -> r = 0.2, 0, 0.2, 0, ...
PER_FN = torch.cat([torch.ones(8, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]] * 4)])  # (16, 3)
SIGNED = t([1, -1] * 4, torch.float32)  # the sign pattern of group 1's advantages
# group 1 by hand: mean 0.1, deviations +-0.1
#   zscore: Bessel var 8 * 0.01 / 7 = 0.08 / 7, std sqrt(0.08 / 7) = 0.106904...; A = +-0.1 / (std + 1e-4)
#   mean: +-0.1;  rloo: 8 / 7 * +-0.1 = +-0.8 / 7
#   rank: the four 0s share rank 2.5, the four 0.2s share 6.5; centre 4.5, half-range 3.5 -> +-2 / 3.5 = +-4 / 7
#   batch_std: batch = 8 x 2.7, 4 x 0.2, 4 x 0; mean 22.4 / 16 = 1.4; squares 8 * 1.3^2 + 4 * 1.2^2 + 4 * 1.4^2
#              = 13.52 + 5.76 + 7.84 = 27.12; Bessel var 27.12 / 15 = 1.808; A = +-0.1 / (sqrt(1.808) + 1e-4)
GROUP1 = {
    "zscore": 0.1 / (math.sqrt(0.08 / 7) + EPS),
    "mean": 0.1,
    "rloo": 0.8 / 7,
    "rank": 4 / 7,
    "batch_std": 0.1 / (math.sqrt(1.808) + EPS),
}


def test_float32_flat_group_has_a_noisy_mean():
    # why the estimators mask flat groups: 8 equal float32 values do not average to themselves. 3 * 2.7f
    # already needs 26 significant bits, so any summation order that adds them one by one rounds; torch's
    # CPU mean here comes out one ulp (2^-22 = 2.4e-7) off, and the old z-score was 2.4e-7 / (2.5e-7 + 1e-4)
    # = 2.4e-3 on every row of a group with no signal. (If a torch build averages exactly, this test is moot,
    # not wrong: the fix is then a no-op.)
    r = (PER_FN @ W).view(2, 8)
    assert (r[0] == r[0, 0]).all()
    noisy = [(x - x.mean()).abs().max().item() for x in (r[0], torch.full((7,), 0.7), torch.full((16,), 0.3))]
    if max(noisy) == 0:
        pytest.skip("this torch build averages equal float32 values exactly")
    assert max(noisy) < 1e-6


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_float32_flat_group_is_exactly_zero(name):
    total = PER_FN @ W  # (16,) float32
    assert zero_std_groups(total, 8).tolist() == [True, False]
    adv = ADVANTAGES[name](total, 8, EPS)
    assert adv.dtype == torch.float32
    assert (adv[:8] == 0).all()  # exactly, so the trainer's `if not adv.any()` sees no signal
    assert_close(adv[8:], GROUP1[name] * SIGNED, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
@pytest.mark.parametrize("value, group_size", [(2.7, 8), (0.7, 7), (0.3, 16), (0.1, 3)])
def test_float32_all_flat_batch_has_no_signal(name, value, group_size):
    # every group flat: before the fix zscore and batch_std gave |A| up to 2.4e-3 (2.7, G = 8), rloo and mean
    # one ulp; now not one entry is nonzero
    rewards = torch.full((2 * group_size,), value, dtype=torch.float32)
    assert not ADVANTAGES[name](rewards, group_size, EPS).any()
