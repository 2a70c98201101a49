"""The GRPO update: given a scored rollout, mu passes of the clipped objective with a k3 KL to pi_ref.

Read top to bottom: behaviour logprobs (only when mu > 1), reference logprobs (only when beta > 0), then
for each of mu passes and each minibatch, micro-batched forward/backward and one optimizer step.
With mu = 1 and one minibatch, logp_old = logp_theta.detach() and no extra forward is run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grouprl.config import GRPOConfig
from grouprl.logprobs import TokenLogprobs, completion_logprobs, grouped_completion_logprobs
from grouprl.losses import Normaliser, grpo_loss
from grouprl.models import Reference
from grouprl.rollout import Rollout


@dataclass
class UpdateStats:
    loss: float = 0.0
    kl: float = 0.0
    clip_frac: float = 0.0
    ratio: float = 0.0
    entropy: float = 0.0
    grad_norm: float = 0.0
    tokens: float = 0.0


def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """Group indices (k,) -> the indices of their rows (k * G,), group by group."""
    return (groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()


def forward_groups(model, rollout: Rollout, rows: Tensor, group_size: int, temperature: float,
                   with_entropy: bool = False, shared_prompt: bool = True) -> TokenLogprobs:
    """Log-probs (n, C) of the completions in `rows` (whole groups, from group_rows).
    With shared_prompt, each prompt runs once per group."""
    g, p = group_size, rollout.prompt_len
    if shared_prompt:
        heads = rows[::g]
        out = grouped_completion_logprobs(
            model, rollout.input_ids[heads, :p], rollout.attention_mask[heads, :p], rollout.input_ids[rows, p:],
            rollout.attention_mask[rows, p:], g, temperature, with_entropy)
    else:
        out = completion_logprobs(model, rollout.input_ids[rows], rollout.attention_mask[rows],
                                  rollout.completion_len, temperature, with_entropy)
    return out


@torch.no_grad()
def sequence_logprobs(model, rollout: Rollout, group_size: int, groups_per_micro: int, temperature: float,
                      shared_prompt: bool) -> Tensor:
    """(N, C) logp of every completion token under `model`, without gradients."""
    logp = torch.zeros_like(rollout.completion_mask)
    for groups in torch.arange(rollout.input_ids.shape[0] // group_size).split(groups_per_micro):
        rows = group_rows(groups, group_size)
        logp[rows] = forward_groups(model, rollout, rows, group_size, temperature, shared_prompt=shared_prompt).logp
    return logp


def grpo_update(
    policy: torch.nn.Module,
    reference: Reference | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rollout: Rollout,
    adv: Tensor,
    cfg: GRPOConfig,
    *,
    temperature: float,
    max_new_tokens: int,
    max_grad_norm: float,
    group_size: int,
    shared_prompt: bool = True,
) -> UpdateStats:
    """Run mu x minibatches optimizer steps on the batch. adv: (N,). Returns token-weighted means.

    Rows come in groups of G that share a prompt; minibatches and micro-batches are made of whole groups.
    """
    mask = rollout.completion_mask.clone()  # (N, C)
    adv = adv.to(mask.device)  # rewards are scored on the CPU
    if not adv.any() and (reference is None or cfg.beta == 0):
        return UpdateStats()  # every group flat and no KL: a step would only be AdamW momentum
    if cfg.mask_truncated:
        mask[rollout.truncated] = 0.0
    g = group_size
    num_groups = mask.shape[0] // g
    per_micro = max(1, cfg.micro_batch_size // g)
    policy.eval()  # pi_old and pi_ref without dropout
    old_logp = None
    if cfg.mu > 1 or cfg.minibatches > 1:  # pi_old is the policy before this step's first update
        old_logp = sequence_logprobs(policy, rollout, g, per_micro, temperature, shared_prompt)
    ref_logp = None
    if reference is not None and cfg.beta > 0:
        with reference.active() as ref_model:
            ref_logp = sequence_logprobs(ref_model, rollout, g, per_micro, temperature, shared_prompt)
    policy.train()

    stats = UpdateStats()
    tokens_seen = 0.0
    steps = 0
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(cfg.mu):
        order = torch.randperm(num_groups) if cfg.minibatches > 1 else torch.arange(num_groups)
        for mini in order.chunk(cfg.minibatches):
            mini_rows = group_rows(mini, g)
            norm = Normaliser(num_seqs=len(mini_rows), num_tokens=mask[mini_rows].sum().item(),
                              max_len=max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            for groups in mini.split(per_micro):
                micro = group_rows(groups, g)
                m = mask[micro]
                if m.sum() == 0:
                    continue  # every completion here is masked: no gradient to take
                out = forward_groups(policy, rollout, micro, g, temperature, True, shared_prompt)
                old = old_logp[micro] if old_logp is not None else out.logp.detach()
                ref = ref_logp[micro] if ref_logp is not None else None
                loss, s = grpo_loss(out.logp, old, ref, adv[micro], m, norm, eps_low=cfg.eps_low,
                                    eps_high=cfg.eps_high, beta=cfg.beta, ratio_type=cfg.ratio,
                                    aggregation=cfg.loss_agg)
                loss.backward()
                stats.loss += loss.item()
                stats.kl += s.kl
                stats.clip_frac += s.clipped
                stats.ratio += s.ratio
                stats.entropy += (out.entropy * m).sum().item()
                tokens_seen += s.tokens
            stats.grad_norm += float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            optimizer.step()
            scheduler.step()
            steps += 1
    denom = max(tokens_seen, 1.0)
    return UpdateStats(
        loss=stats.loss / steps, kl=stats.kl / denom, clip_frac=stats.clip_frac / denom,
        ratio=stats.ratio / denom, entropy=stats.entropy / denom, grad_norm=stats.grad_norm / steps,
        tokens=tokens_seen / steps,
    )
