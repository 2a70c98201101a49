"""Loss pieces as pure functions of tensors: ratios, the clipped surrogate, k3 KL, aggregation (GRPO);
the token-mean clipped policy loss and the clipped value loss (PPO).

Shapes: N sequences, T completion positions. logp, old_logp, ref_logp, mask: (N, T); adv: (N,) for GRPO,
(N, T) for PPO; values, old_values, returns: (N, T). mask is 1.0 on the completion tokens that count (up to
and including EOS) and 0.0 elsewhere.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


def token_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """rho_{i,t} = exp(logp_theta - logp_old), (N, T)."""
    return torch.exp(logp - old_logp)


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO: s_i = exp(mean_t(logp_theta - logp_old)) over the masked tokens, broadcast to (N, T).

    Written as in the GSPO paper, s_{i,t} = sg[s_i] * exp(logp - sg[logp]): its value is s_i on every
    token and its gradient is s_i times the token-mean gradient of logp, the sequence-level objective.
    """
    log_s = ((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N,)
    return (log_s.detach().unsqueeze(1) + logp - logp.detach()).exp()


RATIOS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"token": token_ratio, "sequence": sequence_ratio}


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """PPO/GRPO objective per token: min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A).

    adv is (N,) (one advantage per sequence) or (N, T) (one per token). Returns the objective (N, T) (to be
    maximised) and a bool (N, T) map of where the clipped branch is taken and carries no gradient.
    """
    a = adv.unsqueeze(1) if adv.dim() == 1 else adv  # (N, 1) or (N, T)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * a
    is_clipped = clipped < unclipped
    return torch.minimum(unclipped, clipped), is_clipped


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token, unbiased and >= 0:
    exp(ref - logp) - (ref - logp) - 1.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


class Normaliser(NamedTuple):
    """Batch-wide counts that aggregation divides by, so micro-batches add up to the full-batch loss.

    Convention: a sequence whose mask is all zero (e.g. cut at L_max under mask_truncated, DAPO's overlong
    filtering) is treated as absent from the batch, not as a sequence with loss 0: it counts in neither
    num_tokens nor num_seqs, so every aggregation gives the loss of the batch without it. Build with `of`.
    """

    num_seqs: int  # N: sequences of the whole batch with at least one unmasked token
    num_tokens: float  # sum_i |o_i| over the whole batch (masked tokens)
    max_len: int  # L_max, the generation limit

    @classmethod
    def of(cls, mask: Tensor, max_len: int) -> "Normaliser":
        """Counts of a whole (mini-)batch from its mask (N, T): num_seqs = #{i : sum_t mask_{i,t} > 0},
        num_tokens = sum mask. Build it once over the rows that share an optimizer step, before splitting
        them into micro-batches."""
        return cls(num_seqs=int((mask.sum(1) > 0).sum()), num_tokens=float(mask.sum()), max_len=max_len)


def seq_mean_token_mean(per_token: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """DeepSeekMath GRPO: (1/N) sum_i (1/|o_i|) sum_t L_{i,t}. Each sequence weighs the same, so a token
    of a short answer weighs more than one of a long answer (a length bias).

    N = norm.num_seqs counts only sequences with |o_i| > 0 (`Normaliser.of`): a fully masked sequence adds 0
    to the sum and 0 to N, as in verl's agg_loss "seq-mean-token-mean" (its seq_mask excludes fully masked
    sequences). TRL's "grpo" loss takes .mean() over all rows instead, so masking k of N sequences there also
    scales the step by (N - k) / N."""
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(norm.num_seqs, 1)


def token_mean(per_token: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """DAPO: sum_{i,t} L_{i,t} / sum_i |o_i|. Each token weighs the same across the batch."""
    return (per_token * mask).sum() / max(norm.num_tokens, 1.0)


def constant_norm(per_token: Tensor, mask: Tensor, norm: Normaliser) -> Tensor:
    """Dr. GRPO: sum_{i,t} L_{i,t} / (N * L_max). A constant divisor: no length bias at all. N as in
    seq_mean_token_mean: fully masked sequences are not counted."""
    return (per_token * mask).sum() / (max(norm.num_seqs, 1) * norm.max_len)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, Normaliser], Tensor]] = {
    "seq_mean_token_mean": seq_mean_token_mean,
    "token_mean": token_mean,
    "constant": constant_norm,
}


class EntropyControl(NamedTuple):
    """What the policy loss does about entropy (see grouprl/entropy.py). Defaults: nothing."""

    remedy: str = "none"  # none | clip_cov | kl_cov
    selected: Tensor | None = None  # (N, T) bool: the tokens the remedy acts on (these rows' share)
    kl_cov_coef: float = 1.0
    coef: float = 0.0  # entropy bonus
    entropy: Tensor | None = None  # (N, T) the policy's token entropy, differentiable (when coef > 0)


def policy_objective(ratio: Tensor, logp: Tensor, old_logp: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                     control: EntropyControl) -> tuple[Tensor, Tensor]:
    """The per-token objective (N, T) to maximise and the bool map of clipped tokens.

    none: min(rho A, clip(rho) A). clip_cov: the same, times 0 on the selected tokens (no gradient from them).
    kl_cov: rho A unclipped, minus kl_cov_coef |log rho| on the selected tokens. Then + coef H_t (the bonus).
    """
    if control.remedy == "kl_cov":
        a = adv.unsqueeze(1) if adv.dim() == 1 else adv
        objective = ratio * a - control.kl_cov_coef * (logp - old_logp).abs() * control.selected
        is_clipped = torch.zeros_like(control.selected)
    else:
        objective, is_clipped = clipped_surrogate(ratio, adv, eps_low, eps_high)
        if control.remedy == "clip_cov":
            objective = objective * ~control.selected
    if control.coef:
        objective = objective + control.coef * control.entropy
    return objective, is_clipped


def remedy_tokens(control: EntropyControl, mask: Tensor) -> float:
    """How many unmasked tokens the remedy acted on."""
    return 0.0 if control.selected is None else (control.selected * mask).sum().item()


class GRPOStats(NamedTuple):
    """Sums over the masked tokens of a (micro-)batch; divide by `tokens` for means."""

    tokens: float
    clipped: float  # tokens where the clipped branch is active
    kl: float  # sum of k3 KL (0 without a reference)
    ratio: float  # sum of rho
    remedied: float = 0.0  # tokens the entropy remedy acted on


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    norm: Normaliser,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    ratio_type: str = "token",
    aggregation: str = "seq_mean_token_mean",
    control: EntropyControl = EntropyControl(),
) -> tuple[Tensor, GRPOStats]:
    """Negative GRPO objective: -agg( min(rho A, clip(rho) A) - beta * KL_k3 ), with the entropy control's
    changes to the surrogate (`policy_objective`).  Returns (loss, stats)."""
    ratio = RATIOS[ratio_type](logp, old_logp, mask)
    objective, is_clipped = policy_objective(ratio, logp, old_logp, adv, eps_low, eps_high, control)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = objective - beta * kl
    loss = -AGGREGATIONS[aggregation](per_token, mask, norm)
    with torch.no_grad():
        stats = GRPOStats(
            tokens=mask.sum().item(),
            clipped=(is_clipped.float() * mask).sum().item(),
            kl=(kl * mask).sum().item(),
            ratio=(ratio * mask).sum().item(),
            remedied=remedy_tokens(control, mask),
        )
    return loss, stats


class PPOStats(NamedTuple):
    """Sums over the masked tokens of a (micro-)batch; divide by `tokens` for means."""

    tokens: float
    clipped: float  # tokens where the clipped branch is active
    approx_kl: float  # sum of (rho - 1) - log rho, the k3 estimate of KL(pi_old || pi_theta)
    ratio: float  # sum of rho
    remedied: float = 0.0  # tokens the entropy remedy acted on


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, norm: Normaliser,
                    eps: float, control: EntropyControl = EntropyControl()) -> tuple[Tensor, PPOStats]:
    """Negative PPO clipped objective, token mean over the batch: -sum min(rho A, clip(rho, 1 +- eps) A) /
    sum |o_i|, with the entropy control's changes (`policy_objective`). adv: (N, T), per token (GAE, whitened)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    objective, is_clipped = policy_objective(ratio, logp, old_logp, adv, eps, eps, control)
    loss = -token_mean(objective, mask, norm)
    with torch.no_grad():
        stats = PPOStats(
            tokens=mask.sum().item(),
            clipped=(is_clipped.float() * mask).sum().item(),
            approx_kl=(((ratio - 1) - log_ratio) * mask).sum().item(),
            ratio=(ratio * mask).sum().item(),
            remedied=remedy_tokens(control, mask),
        )
    return loss, stats


class ValueStats(NamedTuple):
    """Sums over the masked tokens of a (micro-)batch; divide by `tokens` for means."""

    tokens: float
    clipped: float  # tokens where the clipped error is strictly larger (the max takes the clipped branch)
    values: float  # sum of V


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, norm: Normaliser,
               eps_value: float | None) -> tuple[Tensor, ValueStats]:
    """Clipped value loss (PPO2 / Ziegler et al.), token mean over the batch:
    0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2). Not yet weighted by vf_coef.

    V is clamped between the bounds, as TRL's PPOTrainer and verl's compute_value_loss do, and not written
    V_old + clip(V - V_old, -eps_v, eps_v): inside the range that rounds (V_old 0.1, V 0.03 in float32 gives
    0.03 + 1 ulp), so the clipped error came out a hair larger and in-range tokens were counted as clipped.
    Clamped, an in-range V is returned bit for bit and `clipped` counts only tokens where clipping moved V
    and the max took that branch (TRL's and verl's vf_clipfrac). Outside the range both forms give the same
    bound, so the loss is unchanged (inside, it differs by at most that ulp)."""
    if eps_value is None:  # no clip: 0.5 (V - R)^2 (Andrychowicz et al. 2021 found value clipping hurts)
        clipped_values = values
    else:
        clipped_values = values.clamp(old_values - eps_value, old_values + eps_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(unclipped_err, clipped_err), mask, norm)
    with torch.no_grad():
        stats = ValueStats(
            tokens=mask.sum().item(),
            clipped=((clipped_err > unclipped_err).float() * mask).sum().item(),
            values=(values * mask).sum().item(),
        )
    return loss, stats


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, 0 no better than a constant,
    negative worse than one."""
    n = mask.sum()
    var_r = (((returns - (returns * mask).sum() / n) * mask) ** 2).sum() / n
    err = (returns - values) * mask
    var_err = (((err - err.sum() / n) * mask) ** 2).sum() / n
    return float(1 - var_err / var_r) if var_r > 0 else float("nan")
