"""PPO's pure functions against numbers worked out by hand: KL-shaped rewards, GAE, whitening, the clipped
policy and value losses, explained variance and the adaptive KL coefficient."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from grouprl.advantages import gae, kl_shaped_rewards, whiten
from grouprl.losses import Normaliser, explained_variance, ppo_policy_loss, value_loss
from grouprl.ppo import adaptive_kl_coef

T = torch.tensor
MASK = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ends after two tokens (right padding)


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    score = T([1.0, 2.0])
    logp = T([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref = T([[-1.5, -2.0, -1.0], [-0.5, -1.0, -3.0]])
    # row 0: -0.1 * (logp - ref) = -0.1 * [0.5, 0, 0.5] = [-0.05, 0, -0.05], + 1.0 on t = 2
    # row 1: -0.1 * [-0.5, 0, (masked)] = [0.05, 0, 0], + 2.0 on t = 1 (its last real token)
    assert_close(kl_shaped_rewards(score, logp, ref, MASK, 0.1), T([[-0.05, 0.0, 0.95], [0.05, 2.0, 0.0]]))
    expected = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])  # no reference, or beta 0: the score alone
    assert_close(kl_shaped_rewards(score, logp, None, MASK, 0.1), expected)
    assert_close(kl_shaped_rewards(score, logp, ref, MASK, 0.0), expected)


REWARDS = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
VALUES = T([[0.5, 0.2, 0.4], [0.1, 0.3, 9.0]])  # 9.0 sits on padding and must be ignored


def test_gae_with_gamma_and_lambda_one_is_return_minus_value():
    adv, returns = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    # row 0: the return to go is 1 everywhere; A = 1 - V = [0.5, 0.8, 0.6]
    # row 1: return to go [2, 2, -]; A = [1.9, 1.7, 0]; the last real token bootstraps from 0, not 9
    assert_close(adv, T([[0.5, 0.8, 0.6], [1.9, 1.7, 0.0]]))
    assert_close(returns, T([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))


def test_gae_by_hand_with_discount_and_lambda():
    adv, returns = gae(REWARDS[:1], VALUES[:1], MASK[:1], gamma=0.9, lam=0.5)
    # delta_2 = 1 + 0.9 * 0 - 0.4 = 0.6                          A_2 = 0.6
    # delta_1 = 0 + 0.9 * 0.4 - 0.2 = 0.16                        A_1 = 0.16 + 0.45 * 0.6 = 0.43
    # delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32                       A_0 = -0.32 + 0.45 * 0.43 = -0.1265
    assert_close(adv, T([[-0.1265, 0.43, 0.6]]))
    assert_close(returns, T([[0.3735, 0.63, 1.0]]))  # A + V


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    adv, _ = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)
    # row 0: [0 + 0.2 - 0.5, 0 + 0.4 - 0.2, 1 + 0 - 0.4]; row 1: [0 + 0.3 - 0.1, 2 + 0 - 0.3, -]
    assert_close(adv, T([[-0.3, 0.2, 0.6], [0.2, 1.7, 0.0]]))


def test_whiten_uses_only_masked_entries():
    x = T([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # entries 1, 2, 3, 4: mean 2.5, var (Bessel) = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    s = math.sqrt(5 / 3)
    assert_close(whiten(x, mask), T([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]]))


def test_value_loss_takes_the_larger_error_in_each_regime():
    v = T([[1.0, 0.6, 0.0]], requires_grad=True)
    old, ret, mask = T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]]), T([[1.0, 1.0, 1.0]])
    loss, stats = value_loss(v, old, ret, mask, Normaliser(1, 3.0, 3), eps_value=0.2)
    # t0: V 1.0 is clipped to 0.7: errors 0 and 0.09 -> 0.09, the clipped branch (no gradient)
    # t1: V 0.6 is inside [0.3, 0.7]: both errors 0.16 -> 0.16
    # t2: V 0.0 is clipped to 0.3: errors 1.0 and 0.49 -> 1.0, the unclipped branch
    assert loss.item() == pytest.approx(0.5 * (0.09 + 0.16 + 1.0) / 3)
    assert stats.clipped == 1 and stats.tokens == 3 and stats.values == pytest.approx(1.6)
    loss.backward()
    # d/dV of 0.5 (V - R)^2 / 3 = (V - R) / 3, where the unclipped error is the one taken
    assert_close(v.grad, T([[0.0, -0.4 / 3, -1.0 / 3]]))


def test_value_loss_without_a_clip_is_the_plain_squared_error():
    v = T([[1.0, 0.6, 0.0]], requires_grad=True)
    old, ret, mask = T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]]), T([[1.0, 1.0, 0.0]])
    loss, stats = value_loss(v, old, ret, mask, Normaliser(1, 2.0, 3), eps_value=None)
    # errors 0, 0.16 (t2 masked) -> 0.5 * 0.16 / 2 = 0.04; nothing clipped
    assert loss.item() == pytest.approx(0.04) and stats.clipped == 0
    loss.backward()
    assert_close(v.grad, T([[0.0, -0.4 / 2, 0.0]]))  # (V - R) / 2 on the unmasked tokens


def test_value_loss_counts_no_clip_inside_the_range():
    # float32, eps_value 0.2, R = 0 on t0, 1 elsewhere
    # t0: V_old 0.1, V 0.03: |V - V_old| = 0.07, well inside. Written V_old + clip(V - V_old), the clipped
    #     value was 0.1f + fl(0.03f - 0.1f) = 0.030000001 (0.03f is 0.029999999), one ulp above V, so its
    #     error 0.03^2 came out a hair larger and t0 counted as clipped; clamping V returns V itself -> not
    #     counted, error 0.0009
    # t1: V_old 0.5, V 1.0 clipped to 0.7: errors (1 - 1)^2 = 0 and (0.7 - 1)^2 = 0.09 -> 0.09, counted
    # t2: V_old 0.5, V 0.0 clipped to 0.3: errors 1.0 and 0.49 -> 1.0, the unclipped branch, not counted
    v = T([[0.03, 1.0, 0.0]], requires_grad=True)
    old, ret = T([[0.1, 0.5, 0.5]]), T([[0.0, 1.0, 1.0]])
    old_form = old + (v.detach() - old).clamp(-0.2, 0.2)
    assert old_form[0, 0] > v[0, 0]  # the rounding that made t0 count, on this build
    loss, stats = value_loss(v, old, ret, torch.ones(1, 3), Normaliser(1, 3.0, 3), eps_value=0.2)
    assert stats.clipped == 1 and stats.tokens == 3
    # 0.5 * 1.0909 / 3 = 0.181816..., to float32 rounding (one ulp there is 1.5e-8)
    assert_close(loss, T(0.5 * (0.0009 + 0.09 + 1.0) / 3), atol=3e-8, rtol=0)
    # the loss is the old form's loss, to that same rounding
    old_loss = 0.5 * torch.maximum((v.detach() - ret) ** 2, (old_form - ret) ** 2).mean()
    assert_close(loss.detach(), old_loss, atol=3e-8, rtol=0)
    loss.backward()
    # d/dV of 0.5 (V - R)^2 / 3 = (V - R) / 3 on t0 and t2; t1 is clipped: 0
    assert_close(v.grad, T([[0.03 / 3, 0.0, -1.0 / 3]]), atol=1e-8, rtol=0)


def test_ppo_policy_loss_clips_each_side_and_stops_their_gradient():
    rho = T([[1.5, 0.5, 1.1, 0.5]])
    adv = T([[1.0, -1.0, 2.0, 1.0]])
    old = T([[-1.0, -1.0, -1.0, -1.0]])
    logp = (old + rho.log()).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), Normaliser(1, 4.0, 4), eps=0.2)
    # t0: A > 0, rho 1.5 -> min(1.5, 1.2) = 1.2 (clipped);  t1: A < 0, rho 0.5 -> min(-0.5, -0.8) = -0.8
    # (clipped); t2: 1.1 * 2 = 2.2;  t3: A > 0, rho 0.5 -> min(0.5, 0.8) = 0.5 (not clipped)
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2 + 0.5) / 4)
    assert stats.clipped == 2 and stats.tokens == 4
    # approx KL: sum of (rho - 1) - log rho
    expected_kl = sum(r - 1 - math.log(r) for r in [1.5, 0.5, 1.1, 0.5])
    assert stats.approx_kl == pytest.approx(expected_kl, rel=1e-6)
    loss.backward()
    # d(-rho A / 4)/d logp = -rho A / 4 on unclipped tokens, 0 on clipped ones
    assert_close(logp.grad, T([[0.0, 0.0, -2.2 / 4, -0.5 / 4]]))


def test_explained_variance():
    r = T([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(r, r, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(r, 2.5), r, mask) == pytest.approx(0.0)
    # error [0, 0, 0, 1]: population variance 0.1875; Var(R) = 1.25 -> 1 - 0.15
    assert explained_variance(T([[1.0, 2.0, 3.0, 3.0]]), r, mask) == pytest.approx(0.85)
    # padding is ignored
    padded = explained_variance(T([[1.0, 2.0, 3.0, 3.0, 50.0]]), T([[1.0, 2.0, 3.0, 4.0, -7.0]]),
                                T([[1.0, 1.0, 1.0, 1.0, 0.0]]))
    assert padded == pytest.approx(0.85)


def test_adaptive_kl_coefficient():
    # beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), target 6, n 10, horizon 100
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped up
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 100, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))  # clipped down
    assert adaptive_kl_coef(0.1, 6.6, 6.0, 100, 10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))  # inside
