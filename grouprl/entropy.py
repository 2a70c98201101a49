"""Entropy control: which tokens the covariance remedies of Cui et al. 2025 act on.

Their analysis: under a softmax policy the entropy changes by about -Cov(log pi(a), A(a)) per step, so the few
tokens with a large positive covariance between their log-prob and their advantage (confident and rewarded,
or unlikely and punished) are what drives entropy down. Clip-Cov leaves a random handful of those tokens
(covariance inside bounds) out of the gradient; KL-Cov puts a |log rho| penalty on the top ones. Both act
on `ratio` x the batch's tokens, at least one.

Here the tokens are picked once per step, over the whole batch, from the behaviour policy's log-probs
(logp_old): the same tokens in every pass, micro-batch split and rank layout, so the update does not depend on
how the batch is cut. verl picks them per micro-batch from the current log-probs, which on the first pass
are the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_covariance(logp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """(A_t - mean A)(logp_t - mean logp) per token, the means over the masked tokens of the batch; (N, T),
    0 on masked-out tokens. adv: (N,) per sequence (GRPO) or (N, T) per token (PPO)."""
    a = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(logp).float()
    m = mask.bool()
    n = m.sum().clamp(min=1)
    mean_a = (a * m).sum() / n
    mean_l = (logp.float() * m).sum() / n
    return torch.where(m, (a - mean_a) * (logp.float() - mean_l), torch.zeros_like(a))


def count(ratio: float, mask: Tensor) -> int:
    """How many tokens a remedy acts on: ratio x the masked tokens, rounded down, at least one."""
    return max(1, int(ratio * mask.sum().item()))


def kl_cov_select(cov: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """KL-Cov: the `count(ratio)` masked tokens with the largest covariance, as a bool (N, T)."""
    m = mask.bool()
    k = min(count(ratio, mask), int(m.sum()))
    scores = torch.where(m, cov, torch.full_like(cov, -torch.inf)).flatten()
    out = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    out[scores.topk(k).indices] = True
    return out.view_as(cov) & m


def clip_cov_select(cov: Tensor, mask: Tensor, ratio: float, low: float, high: float,
                    generator: torch.Generator) -> Tensor:
    """Clip-Cov: `count(ratio)` tokens drawn at random (without replacement) among the masked tokens whose
    covariance lies strictly between low and high (all of them when fewer qualify), as a bool (N, T)."""
    candidates = (mask.bool() & (cov > low) & (cov < high)).flatten().nonzero().flatten()
    k = min(count(ratio, mask), len(candidates))
    pick = candidates[torch.randperm(len(candidates), generator=generator)[:k].to(candidates.device)]
    out = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    out[pick] = True
    return out.view_as(cov)


def select_tokens(remedy: str, logp_old: Tensor, adv: Tensor, mask: Tensor, *, ratio: float,
                  bounds: tuple[float, float], seed: int) -> Tensor | None:
    """The tokens `remedy` acts on this step (bool (N, T)), or None for 'none'. seed: clip_cov's draw."""
    if remedy == "none":
        return None
    cov = token_covariance(logp_old, adv, mask)
    if remedy == "kl_cov":
        return kl_cov_select(cov, mask, ratio)
    if remedy == "clip_cov":
        return clip_cov_select(cov, mask, ratio, *bounds, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"entropy.remedy={remedy!r}: expected none, clip_cov or kl_cov")
