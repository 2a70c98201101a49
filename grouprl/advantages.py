"""Advantage estimators: pure functions from rewards (and, for PPO, critic values) to advantages.

GRPO: every function in `ADVANTAGES` takes rewards of shape (N,) laid out group by group (N = B * G:
completions 0..G-1 answer prompt 0, G..2G-1 prompt 1, ...) and returns advantages of shape (N,), the same
for every token of o_i. A group whose G rewards are all equal (`zero_std_groups`) gets A = 0 exactly under
every estimator, so "no signal" is a test of `adv.any()`, not a tolerance.

PPO: `kl_shaped_rewards` turns the sequence score into per-token rewards (N, T), `gae` turns those and the
critic's values into per-token advantages and returns, `whiten` normalises over the batch. mask (N, T) is
1.0 on the completion tokens through EOS (right-padded: ones, then zeros).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    assert rewards.dim() == 1 and rewards.numel() % group_size == 0, (rewards.shape, group_size)
    return rewards.view(-1, group_size)  # (B, G)


def _zero_flat_groups(adv: Tensor, rewards: Tensor, group_size: int) -> Tensor:
    """adv (N,) with A_i = 0 exactly in every group where `zero_std_groups` holds.

    In floating point the mean of G equal values need not equal them: 8 copies of float32 2.7 are summed in
    an order that rounds, so r - mean(r) is one ulp (2.4e-7) and z-score's one ulp / (std ~ 2.5e-7 + eps
    1e-4) is 2.4e-3, not 0. Masking with the same predicate the sampler uses keeps one definition of flat.
    """
    flat = zero_std_groups(rewards, group_size).repeat_interleave(group_size)  # (N,)
    return torch.where(flat, torch.zeros_like(adv), adv)


def group_zscore(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """DeepSeekMath: A_i = (r_i - mean(r)) / (std(r) + eps), std with Bessel's correction (as torch.std)."""
    r = _groups(rewards, group_size)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()
    return _zero_flat_groups(adv, rewards, group_size)


def group_mean(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean(r). No std division, so easy/hard groups are not up-weighted."""
    r = _groups(rewards, group_size)
    return _zero_flat_groups((r - r.mean(1, keepdim=True)).flatten(), rewards, group_size)


def leave_one_out(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """RLOO: A_i = r_i - (sum_{j != i} r_j) / (G - 1)  (= G / (G - 1) * (r_i - mean(r)))."""
    r = _groups(rewards, group_size)
    adv = (r - (r.sum(1, keepdim=True) - r) / (group_size - 1)).flatten()
    return _zero_flat_groups(adv, rewards, group_size)


def rank(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Centred rank in the group scaled to [-1, 1]: A_i = (rank_i - (G + 1) / 2) / ((G - 1) / 2).

    rank_i runs 1..G from the lowest reward; tied rewards share the mean of their ranks, so an all-equal
    group gets A = 0. Only the order of rewards matters (a judge that ranks the G answers at once).
    """
    r = _groups(rewards, group_size)
    less = (r.unsqueeze(2) > r.unsqueeze(1)).sum(2).to(r.dtype)  # (B, G): how many rewards are below r_i
    equal = (r.unsqueeze(2) == r.unsqueeze(1)).sum(2).to(r.dtype)  # (B, G): ties, r_i itself included
    mean_rank = less + (equal + 1) / 2
    half = (group_size - 1) / 2
    # ties are found by ==, as in zero_std_groups, so a flat group is already exactly 0; masked all the same
    return _zero_flat_groups(((mean_rank - (group_size + 1) / 2) / half).flatten(), rewards, group_size)


def batch_std(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """REINFORCE++ baseline: A_i = (r_i - mean(r of its group)) / (std(r over the whole batch) + eps).

    The batch std (Bessel-corrected) is steadier than a group std of G values and keeps the relative scale
    of groups: a group with a small spread gets small advantages. Flat groups are 0 exactly (group_mean's
    numerator is), even when the whole batch is flat and rewards.std() is rounding noise.
    """
    return group_mean(rewards, group_size) / (rewards.std() + eps)


ADVANTAGES: dict[str, Callable[[Tensor, int, float], Tensor]] = {
    "zscore": group_zscore,
    "mean": group_mean,
    "rloo": leave_one_out,
    "rank": rank,
    "batch_std": batch_std,
}


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) bool: groups whose G rewards are all equal, which carry no learning signal under any estimator."""
    r = _groups(rewards, group_size)
    return (r == r[:, :1]).all(1)


def kl_shaped_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor | None, mask: Tensor, kl_coef: float,
                      turn_rewards: Tensor | None = None) -> Tensor:
    """Per-token PPO rewards (N, T): r_t = -kl_coef * (logp - ref_logp)_t (the k1 KL estimate, Ziegler et al.
    2019 / InstructGPT), plus the sequence score (N,) on the last token the model sampled. Zero past the end
    and on the environment's tokens (mask 0). turn_rewards (N, T): an episode's per-turn rewards, each already
    on the last model token of its turn, added as they are."""
    rewards = torch.zeros_like(mask)
    if ref_logp is not None and kl_coef:
        rewards = -kl_coef * (logp - ref_logp) * mask
    if turn_rewards is not None:
        rewards = rewards + turn_rewards * mask
    last = last_token(mask)  # (N,)
    return rewards.index_put((torch.arange(len(score)), last), score.to(rewards.dtype), accumulate=True)


def last_token(mask: Tensor) -> Tensor:
    """(N,) the column of each row's last masked-in token (0 for a row with none)."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    return (mask.bool() * (cols + 1)).amax(1).sub(1).clamp(min=0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per token, right to left, over the tokens in
    the mask only: with t_1 < t_2 < ... the masked-in positions of a row,
    delta_k = r_{t_k} + gamma V_{t_k+1} - V_{t_k},  A_k = delta_k + gamma lam A_{k+1},  R_k = A_k + V_{t_k},
    with V and A taken as 0 after the last one. A token outside the mask (an environment's reply between
    the model's turns, or padding) is neither a state nor an action: it is skipped. rewards, values, mask:
    (N, T). Returns (advantages, returns), both (N, T) and zero outside the mask."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    next_value = next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        inside = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = (delta + gamma * lam * next_adv) * mask[:, t]
        next_adv = torch.where(inside, a, next_adv)
        next_value = torch.where(inside, values[:, t], next_value)
        adv[:, t] = a
    return adv, (adv + values) * mask


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch (var with Bessel's
    correction); zero outside the mask."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask
