"""The GRPO update: given a scored rollout, mu passes of the clipped objective with a k3 KL to pi_ref.

Read top to bottom: behaviour logprobs (only when mu > 1), reference logprobs (only when beta > 0), then
for each of mu passes and each minibatch, micro-batched forward/backward and one optimizer step.
With mu = 1 and one minibatch, logp_old = logp_theta.detach() and no extra forward is run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from grouprl.advantages import ADVANTAGES
from grouprl.config import GRPOConfig, TrainConfig
from grouprl.logprobs import forward_groups, group_rows, sequence_logprobs
from grouprl.losses import Normaliser, grpo_loss
from grouprl.models import Reference, trainable_parameters
from grouprl.optim import make_optimizer
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
    prep_time: float = 0.0  # seconds in the no-grad forwards (pi_old, pi_ref)


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
    t0 = time.perf_counter()
    policy.eval()  # pi_old and pi_ref without dropout
    old_logp = None
    if cfg.mu > 1 or cfg.minibatches > 1:  # pi_old is the policy before this step's first update
        old_logp = sequence_logprobs(policy, rollout, g, per_micro, temperature, shared_prompt)
    ref_logp = None
    if reference is not None and cfg.beta > 0:
        with reference.active() as ref_model:
            ref_logp = sequence_logprobs(ref_model, rollout, g, per_micro, temperature, shared_prompt)
    policy.train()
    prep_time = time.perf_counter() - t0

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
        tokens=tokens_seen / steps, prep_time=prep_time,
    )


class GRPO:
    """GRPO for the training loop: advantages, the reference (when beta > 0) and the optimizer."""

    name = "GRPO"

    def __init__(self, cfg: TrainConfig, policy: torch.nn.Module):
        self.cfg, self.policy = cfg, policy
        self.reference = Reference(policy, cfg.model.lora.enabled) if cfg.grpo.beta > 0 else None
        self.optimizer, self.scheduler = make_optimizer([p for p in policy.parameters() if p.requires_grad],
                                                        cfg.optim.lr, cfg.optim)
        self.models_trained = 1
        self.models_in_memory = 1 + (self.reference is not None and not self.reference.lora)
        self.trainable_parameters = trainable_parameters(policy)

    def update(self, rollout: Rollout, score: Tensor, step: int) -> tuple[dict[str, float], Tensor]:
        """One step; returns its metrics and the advantages (N,)."""
        c = self.cfg
        adv = ADVANTAGES[c.grpo.advantage](score, c.rollout.group_size, c.grpo.eps_std)  # (N,)
        upd = grpo_update(self.policy, self.reference, self.optimizer, self.scheduler, rollout, adv, c.grpo,
                          temperature=c.rollout.temperature, max_new_tokens=c.rollout.max_new_tokens,
                          max_grad_norm=c.optim.max_grad_norm, group_size=c.rollout.group_size,
                          shared_prompt=not c.model.gradient_checkpointing)
        if self.reference is not None and c.grpo.ref_refresh_steps and step % c.grpo.ref_refresh_steps == 0:
            self.reference.refresh(self.policy)
        metrics = {"kl": upd.kl, "clip_frac": upd.clip_frac, "ratio": upd.ratio, "entropy": upd.entropy,
                   "loss": upd.loss, "grad_norm": upd.grad_norm, "prep_time": upd.prep_time,
                   "lr": self.scheduler.get_last_lr()[0]}
        return metrics, adv

    def console(self, m: dict[str, float]) -> str:
        return f"kl {m['kl']:.4f}  clip {m['clip_frac']:.3f}  ent {m['entropy']:.2f}"

    def optimizer_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def state(self) -> dict:
        return {}

    def save_extra(self, folder: Path) -> None:
        pass

    def load(self, folder: Path, optim_state: dict, state: dict) -> None:
        """Resume: the optimizer and scheduler of a checkpoint (the policy's weights are loaded by the loop)."""
        self.optimizer.load_state_dict(optim_state["optimizer"])
        self.scheduler.load_state_dict(optim_state["scheduler"])
