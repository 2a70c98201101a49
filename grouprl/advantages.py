"""Advantage estimators for GRPO: pure functions from outcome rewards to per-sequence advantages.

Every function takes rewards of shape (N,) laid out group by group (N = B * G: completions 0..G-1 answer
prompt 0, G..2G-1 prompt 1, ...) and returns advantages of shape (N,), the same for every token of o_i.
`ADVANTAGES` maps the config names to the functions.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    assert rewards.dim() == 1 and rewards.numel() % group_size == 0, (rewards.shape, group_size)
    return rewards.view(-1, group_size)  # (B, G)


def group_zscore(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """DeepSeekMath: A_i = (r_i - mean(r)) / (std(r) + eps), std with Bessel's correction (as torch.std)."""
    r = _groups(rewards, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()


def group_mean(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean(r). No std division, so easy/hard groups are not up-weighted."""
    r = _groups(rewards, group_size)
    return (r - r.mean(1, keepdim=True)).flatten()


def leave_one_out(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """RLOO: A_i = r_i - (sum_{j != i} r_j) / (G - 1)  (= G / (G - 1) * (r_i - mean(r)))."""
    r = _groups(rewards, group_size)
    return (r - (r.sum(1, keepdim=True) - r) / (group_size - 1)).flatten()


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
    return ((mean_rank - (group_size + 1) / 2) / half).flatten()


def batch_std(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """REINFORCE++ baseline: A_i = (r_i - mean(r of its group)) / (std(r over the whole batch) + eps).

    The batch std (Bessel-corrected) is steadier than a group std of G values and keeps the relative scale
    of groups: a group with a small spread gets small advantages.
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
