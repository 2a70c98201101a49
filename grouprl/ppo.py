"""The PPO update with a learned critic (Schulman et al. 2017; the RLHF form of Ziegler et al. 2019 and
InstructGPT), under the same rollout and rewards as GRPO.

Read top to bottom (`ppo_update`):
1. without gradients: logp_old of the policy, V_old of the critic, logp_ref of the reference;
2. per-token rewards: -kl_coef * (logp_old - logp_ref), plus the sequence score on the last token;
3. GAE advantages and returns, advantages whitened over the batch;
4. epochs x minibatches optimizer steps of  clipped policy loss + vf_coef * clipped value loss,
   micro-batched; the policy is left alone during the critic warm-up steps.
The adaptive KL controller (`adaptive_kl_coef`) moves kl_coef between steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from grouprl.advantages import gae, kl_shaped_rewards, whiten
from grouprl.config import PPOConfig, TrainConfig
from grouprl.critic import Critic, load_critic
from grouprl.logprobs import forward_groups, group_rows, sequence_logprobs
from grouprl.losses import Normaliser, explained_variance, ppo_policy_loss, value_loss
from grouprl.models import Reference, trainable_parameters
from grouprl.optim import make_optimizer
from grouprl.rollout import Rollout


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, num_seqs: int) -> float:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), with KL the
    mean summed KL per completion and n the sequences in the batch."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * num_seqs / horizon)


@dataclass
class PPOStepStats:
    """Means over the masked tokens of the batch (losses: over optimizer steps)."""

    loss: float = 0.0  # policy loss
    value_loss: float = 0.0
    clip_frac: float = 0.0  # policy
    value_clip_frac: float = 0.0
    approx_kl: float = 0.0  # KL(pi_old || pi_theta), k3, during the update
    ratio: float = 0.0
    entropy: float = 0.0
    grad_norm: float = 0.0  # policy (a shared trunk included; its head counts under critic_grad_norm)
    critic_grad_norm: float = 0.0
    kl: float = 0.0  # k1 KL to the reference per token, at rollout time
    kl_seq: float = 0.0  # the same summed over each completion, mean over completions
    explained_var: float = 0.0  # of V_old against the returns
    values: float = 0.0  # mean V_old
    returns: float = 0.0  # mean return
    prep_time: float = 0.0  # seconds in the no-grad forwards of step 1


def ppo_update(
    policy: torch.nn.Module,
    critic: Critic,
    reference: Reference | None,
    policy_opt: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    critic_opt: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    rollout: Rollout,
    score: Tensor,
    cfg: PPOConfig,
    *,
    kl_coef: float,
    temperature: float,
    max_new_tokens: int,
    max_grad_norm: float,
    group_size: int,
    shared_prompt: bool = True,
    train_policy: bool = True,
) -> tuple[PPOStepStats, Tensor]:
    """One PPO step on a scored batch. score: (N,) sequence rewards. Returns the stats and the advantages
    (N, C) (whitened when configured)."""
    t0 = time.perf_counter()
    mask = rollout.completion_mask  # (N, C)
    score = score.to(mask.device) - cfg.missing_eos_penalty * rollout.truncated.to(mask.device).float()
    g = group_size
    num_groups = mask.shape[0] // g
    per_micro = max(1, cfg.micro_batch_size // g)

    # 1. behaviour policy, old values and reference, without dropout or gradients
    policy.eval()
    critic.train(False)
    old_logp, old_values = torch.zeros_like(mask), torch.zeros_like(mask)
    with torch.no_grad():
        for groups in torch.arange(num_groups).split(per_micro):
            rows = group_rows(groups, g)
            out = forward_groups(policy, rollout, rows, g, temperature, shared_prompt=shared_prompt,
                                 with_hidden=critic.shared)
            old_logp[rows] = out.logp
            old_values[rows] = critic.values(rollout, rows, g, shared_prompt, out)
    ref_logp = None
    if reference is not None and kl_coef > 0:
        with reference.active() as ref_model:
            ref_logp = sequence_logprobs(ref_model, rollout, g, per_micro, temperature, shared_prompt)
    prep_time = time.perf_counter() - t0

    # 2-3. KL-shaped rewards, GAE, whitening
    rewards = kl_shaped_rewards(score, old_logp, ref_logp, mask, kl_coef)  # (N, C)
    adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # (N, C) each
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    n_tok = mask.sum().item()
    k1 = (old_logp - ref_logp) * mask if ref_logp is not None else torch.zeros_like(mask)
    stats = PPOStepStats(
        kl=k1.sum().item() / n_tok, kl_seq=k1.sum(1).mean().item(),
        explained_var=explained_variance(old_values, returns, mask),
        values=(old_values * mask).sum().item() / n_tok, returns=(returns * mask).sum().item() / n_tok,
        prep_time=prep_time,
    )

    # 4. epochs x minibatches of clipped policy loss + vf_coef * clipped value loss
    policy.train(train_policy)
    critic.train(True)
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    critic_params = critic.parameters()
    sums = dict(loss=0.0, value_loss=0.0, clipped=0.0, value_clipped=0.0, approx_kl=0.0, ratio=0.0, entropy=0.0,
                grad_norm=0.0, critic_grad_norm=0.0)
    tokens = steps = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(num_groups) if cfg.minibatches > 1 else torch.arange(num_groups)
        for mini in order.chunk(cfg.minibatches):
            mini_rows = group_rows(mini, g)
            norm = Normaliser(num_seqs=len(mini_rows), num_tokens=mask[mini_rows].sum().item(),
                              max_len=max_new_tokens)
            policy_opt[0].zero_grad(set_to_none=True)
            critic_opt[0].zero_grad(set_to_none=True)
            for groups in mini.split(per_micro):
                micro = group_rows(groups, g)
                m = mask[micro]
                out = None
                pg_loss = torch.zeros((), device=mask.device)
                if train_policy:
                    out = forward_groups(policy, rollout, micro, g, temperature, True, shared_prompt,
                                         with_hidden=critic.shared)
                    pg_loss, ps = ppo_policy_loss(out.logp, old_logp[micro], adv[micro], m, norm, cfg.eps)
                    sums["clipped"] += ps.clipped
                    sums["approx_kl"] += ps.approx_kl
                    sums["ratio"] += ps.ratio
                    sums["entropy"] += (out.entropy * m).sum().item()
                values = critic.values(rollout, micro, g, shared_prompt, out)
                vf_loss, vs = value_loss(values, old_values[micro], returns[micro], m, norm, cfg.eps_value)
                (pg_loss + cfg.vf_coef * vf_loss).backward()
                sums["loss"] += pg_loss.item()
                sums["value_loss"] += vf_loss.item()
                sums["value_clipped"] += vs.clipped
                tokens += vs.tokens
            if train_policy:
                sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(policy_params, max_grad_norm))
                policy_opt[0].step()
                policy_opt[1].step()
            sums["critic_grad_norm"] += float(torch.nn.utils.clip_grad_norm_(critic_params, max_grad_norm))
            critic_opt[0].step()
            critic_opt[1].step()
            steps += 1
    denom = max(tokens, 1.0)
    stats.loss, stats.value_loss = sums["loss"] / steps, sums["value_loss"] / steps
    stats.clip_frac, stats.value_clip_frac = sums["clipped"] / denom, sums["value_clipped"] / denom
    stats.approx_kl, stats.ratio, stats.entropy = sums["approx_kl"] / denom, sums["ratio"] / denom, sums["entropy"] / denom
    stats.grad_norm, stats.critic_grad_norm = sums["grad_norm"] / steps, sums["critic_grad_norm"] / steps
    return stats, adv


class PPO:
    """PPO for the training loop: the critic, the reference, two optimizers and the KL controller."""

    name = "PPO"

    def __init__(self, cfg: TrainConfig, policy: torch.nn.Module):
        self.cfg, self.policy = cfg, policy
        self.critic = load_critic(cfg, policy)
        self.reference = Reference(policy, cfg.model.lora.enabled) if cfg.ppo.kl_coef > 0 else None
        self.kl_coef = cfg.ppo.kl_coef
        self.policy_opt = make_optimizer([p for p in policy.parameters() if p.requires_grad], cfg.optim.lr,
                                         cfg.optim)
        self.critic_opt = make_optimizer(self.critic.parameters(), cfg.ppo.critic.lr or cfg.optim.lr, cfg.optim)
        self.models_trained = 1 if self.critic.shared else 2
        self.models_in_memory = self.models_trained + (self.reference is not None and not self.reference.lora)
        self.trainable_parameters = trainable_parameters(policy) + sum(
            p.numel() for p in self.critic.parameters())

    def update(self, rollout: Rollout, score: Tensor, step: int) -> tuple[dict[str, float], Tensor]:
        """One step; returns its metrics and a per-sequence advantage (token mean) for the completions log."""
        c = self.cfg
        kl_coef = self.kl_coef
        s, adv = ppo_update(
            self.policy, self.critic, self.reference, self.policy_opt, self.critic_opt, rollout, score, c.ppo,
            kl_coef=kl_coef, temperature=c.rollout.temperature, max_new_tokens=c.rollout.max_new_tokens,
            max_grad_norm=c.optim.max_grad_norm, group_size=c.rollout.group_size,
            shared_prompt=not c.model.gradient_checkpointing, train_policy=step > c.ppo.critic_warmup_steps)
        if c.ppo.kl_target is not None and self.reference is not None:
            self.kl_coef = adaptive_kl_coef(kl_coef, s.kl_seq, c.ppo.kl_target, c.ppo.kl_horizon, len(score))
        mask = rollout.completion_mask
        seq_adv = (adv * mask).sum(1) / mask.sum(1).clamp(min=1)
        metrics = {k: float(v) for k, v in vars(s).items()} | {
            "kl_coef": kl_coef, "lr": self.policy_opt[1].get_last_lr()[0],
            "critic_lr": self.critic_opt[1].get_last_lr()[0],
        }
        return metrics, seq_adv.cpu()

    def console(self, m: dict[str, float]) -> str:
        return (f"kl {m['kl']:.4f}  clip {m['clip_frac']:.3f}  vloss {m['value_loss']:.3f}  "
                f"ev {m['explained_var']:.2f}  ent {m['entropy']:.2f}")

    def optimizer_state(self) -> dict:
        return {"optimizer": self.policy_opt[0].state_dict(), "scheduler": self.policy_opt[1].state_dict(),
                "critic_optimizer": self.critic_opt[0].state_dict(),
                "critic_scheduler": self.critic_opt[1].state_dict()}

    def state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def save_extra(self, folder: Path) -> None:
        self.critic.save(folder)

    def load(self, folder: Path, optim_state: dict, state: dict) -> None:
        """Resume: the critic, both optimizers and schedulers, and the KL coefficient of a checkpoint."""
        self.critic.load(folder)
        self.policy_opt[0].load_state_dict(optim_state["optimizer"])
        self.policy_opt[1].load_state_dict(optim_state["scheduler"])
        self.critic_opt[0].load_state_dict(optim_state["critic_optimizer"])
        self.critic_opt[1].load_state_dict(optim_state["critic_scheduler"])
        if self.cfg.ppo.kl_target is not None:  # adaptive: where the controller had moved it
            self.kl_coef = state["kl_coef"]
