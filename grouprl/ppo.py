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
from grouprl.config import EntropyConfig, PPOConfig, TrainConfig
from grouprl.critic import Critic, load_critic
from grouprl.distributed import wrap
from grouprl.entropy import select_tokens
from grouprl.learner import no_grad_rows, run_minibatches, sequence_logprobs, shuffle_seed
from grouprl.logprobs import attention, forward_groups, pick_layout
from grouprl.microbatch import Budget
from grouprl.losses import EntropyControl, Normaliser, explained_variance, ppo_policy_loss, value_loss
from grouprl.models import Reference
from grouprl.optim import Optim, make_optimizer
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
    entropy_remedied: float = 0.0  # fraction of the tokens the entropy remedy acted on
    grad_norm: float = 0.0  # policy (a shared trunk included; its head counts under critic_grad_norm)
    critic_grad_norm: float = 0.0
    value_loss_last: float = 0.0  # critic.epochs > epochs: the mean value loss of the critic-only epochs
    kl: float = 0.0  # k1 KL to the reference per token, at rollout time
    kl_seq: float = 0.0  # the same summed over each completion, mean over completions
    explained_var: float = 0.0  # of V_old against the returns
    values: float = 0.0  # mean V_old
    returns: float = 0.0  # mean return
    prep_time: float = 0.0  # seconds in the no-grad forwards of step 1
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    update_steps: int = 0  # optimizer steps taken


def ppo_update(
    policy: torch.nn.Module,
    critic: Critic,
    reference: Reference | None,
    policy_optim: Optim,
    critic_optim: Optim,
    rollout: Rollout,
    score: Tensor,
    cfg: PPOConfig,
    *,
    kl_coef: float,
    max_new_tokens: int,
    layout: str = "shared",
    train_policy: bool = True,
    seed: int = 0,
    entropy: EntropyConfig = EntropyConfig(),
    budget: Budget | None = None,
) -> tuple[PPOStepStats, Tensor]:
    """One PPO step on a scored batch. score: (N,) sequence rewards. Returns the stats and the advantages
    (N, C) (whitened when configured). seed: the minibatch shuffle's (see run_minibatches) and clip_cov's
    draw. entropy: the bonus and the covariance remedy (tokens picked from pi_old and the final advantages)."""
    t0 = time.perf_counter()
    mask = rollout.completion_mask  # (N, C)
    score = score.to(mask.device) - cfg.missing_eos_penalty * rollout.truncated.to(mask.device).float()
    g = rollout.group_size
    per_micro = max(1, cfg.micro_batch_size // g)

    # 1. behaviour policy, old values and reference, without dropout or gradients
    policy.eval()
    critic.train(False)

    def behaviour(rows: Tensor) -> dict[str, Tensor]:
        out = forward_groups(policy, rollout, rows, layout=layout, with_hidden=critic.shared)
        return {"logp": out.logp, "values": critic.values(rollout, rows, layout, out)}

    old = no_grad_rows(mask.shape[0], g, per_micro, behaviour, rollout, budget)
    old_logp, old_values = old["logp"], old["values"]  # (N, C) each
    ref_logp = None
    if reference is not None and kl_coef > 0:
        with reference.active() as ref_model:
            ref_logp = sequence_logprobs(ref_model, rollout, per_micro, layout, budget)
    prep_time = time.perf_counter() - t0

    # 2-3. KL-shaped rewards, GAE, whitening
    turns = rollout.turn_rewards  # episodes: per-turn rewards at their turns, the rest of the score at the end
    if turns is not None:
        score = score - turns.sum(1).to(score.device)
    rewards = kl_shaped_rewards(score, old_logp, ref_logp, mask, kl_coef, turns)  # (N, C)
    adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # (N, C) each
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    selected = select_tokens(entropy.remedy, old_logp, adv, mask, ratio=entropy.cov_ratio,
                             bounds=entropy.clip_cov_bounds, seed=seed)
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

    def micro_step(rows: Tensor, norm: Normaliser, with_policy: bool = train_policy) -> tuple[Tensor, dict]:
        m = mask[rows]
        out, sums = None, {}
        pg_loss = torch.zeros((), device=mask.device)
        if with_policy:
            out = forward_groups(policy, rollout, rows, with_entropy="grad" if entropy.coef else True, layout=layout,
                                 with_hidden=critic.shared)
            control = EntropyControl(entropy.remedy, None if selected is None else selected[rows], entropy.kl_cov_coef,
                                     entropy.coef, out.entropy)
            pg_loss, ps = ppo_policy_loss(out.logp, old_logp[rows], adv[rows], m, norm, cfg.eps, control)
            sums = {"clipped": ps.clipped, "approx_kl": ps.approx_kl, "ratio": ps.ratio, "remedied": ps.remedied,
                    "entropy": (out.entropy.detach() * m).sum().item()}
        values = critic.values(rollout, rows, layout, out)
        vf_loss, vs = value_loss(values, old_values[rows], returns[rows], m, norm, cfg.eps_value)
        sums |= {"loss": pg_loss.item(), "value_loss": vf_loss.item(), "value_clipped": vs.clipped,
                 "tokens": vs.tokens}
        return pg_loss + cfg.vf_coef * vf_loss, sums

    optims = [policy_optim, critic_optim] if train_policy else [critic_optim]
    p = run_minibatches(rollout, mask, epochs=cfg.epochs, minibatches=cfg.minibatches,
                        micro_batch_size=cfg.micro_batch_size, max_len=max_new_tokens, optims=optims,
                        models=([policy] if train_policy else []) + critic.modules(), micro_step=micro_step,
                        shuffle_seed=seed, budget=budget)
    s, steps, tokens = p.sums, max(p.steps, 1), max(p.sums.get("tokens", 0.0), 1.0)
    stats.nonfinite_steps, stats.update_steps = p.nonfinite, p.steps
    stats.loss, stats.value_loss = s.get("loss", 0.0) / steps, s.get("value_loss", 0.0) / steps
    stats.clip_frac, stats.value_clip_frac = s.get("clipped", 0.0) / tokens, s.get("value_clipped", 0.0) / tokens
    stats.approx_kl, stats.ratio = s.get("approx_kl", 0.0) / tokens, s.get("ratio", 0.0) / tokens
    stats.entropy = s.get("entropy", 0.0) / tokens
    stats.entropy_remedied = s.get("remedied", 0.0) / tokens
    if p.steps:
        stats.critic_grad_norm = p.grad_norms[-1] / p.steps
        stats.grad_norm = p.grad_norms[0] / p.steps if train_policy else 0.0
    if cfg.critic.epochs is not None and cfg.critic.epochs > cfg.epochs:  # then the critic alone, same batch
        v = run_minibatches(rollout, mask, epochs=cfg.critic.epochs - cfg.epochs, minibatches=cfg.minibatches,
                            micro_batch_size=cfg.micro_batch_size, max_len=max_new_tokens, optims=[critic_optim],
                            models=critic.modules(), shuffle_seed=seed + cfg.epochs, budget=budget,
                            micro_step=lambda rows, norm: micro_step(rows, norm, with_policy=False))
        stats.nonfinite_steps += v.nonfinite
        stats.update_steps += v.steps
        stats.value_loss_last = v.sums.get("value_loss", 0.0) / max(v.steps, 1)  # after the joint epochs
    return stats, adv


UPDATE_KEYS = {"loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "ratio", "entropy",
               "entropy_remedied", "grad_norm",
               "critic_grad_norm", "value_loss_last"}  # the metrics that only an optimizer step produces


def critic_optimizer(cfg: TrainConfig, critic: Critic) -> Optim:
    """The critic's AdamW: its trainable weights at ppo.critic.lr, the value head at ppo.critic.head_lr."""
    lr = cfg.ppo.critic.lr or cfg.optim.lr
    return make_optimizer(critic.trunk_parameters(), lr, cfg.optim,
                          extra=(list(critic.head.parameters()), cfg.ppo.critic.head_lr or lr))


class PPO:
    """PPO for the training loop: the critic, the reference, two optimizers and the KL controller."""

    name = "PPO"
    summary_keys = ["kl", "explained_var", "value_loss"]
    resamples_flat_groups = False  # a critic learns from flat groups too
    max_sampling_rounds = 1

    def __init__(self, cfg: TrainConfig, policy: torch.nn.Module):
        """policy: the model as loaded; under torchrun it and the critic are wrapped here (after the
        reference is copied, before the optimizers are built)."""
        self.cfg = cfg
        self.layout = pick_layout(cfg.model.update_layout, cfg.model.gradient_checkpointing, attention(policy))
        self.reference = Reference(policy, cfg.model.lora.enabled) if cfg.ppo.kl_coef > 0 else None
        if self.reference is not None and not self.reference.lora:
            self.reference.model = wrap(self.reference.model, cfg.distributed, trainable=False)
        self.critic = load_critic(cfg, policy)
        self.policy = wrap(policy, cfg.distributed)
        self.critic.wrap(self.policy, cfg.distributed)
        self.kl_coef = cfg.ppo.kl_coef
        self.budget = Budget(cfg.max_tokens_per_micro_batch)
        critic_params = self.critic.parameters()
        own = {id(p) for p in critic_params}  # an adapter critic's weights sit in the policy's model
        params = [p for p in self.policy.parameters() if p.requires_grad and id(p) not in own]
        self.policy_optim = make_optimizer(params, cfg.optim.lr, cfg.optim)
        self.critic_optim = critic_optimizer(cfg, self.critic)
        self.models_trained = 1 if self.critic.shared else 2
        self.models_in_memory = (2 if self.critic.kind == "separate" else 1) + (
            self.reference is not None and not self.reference.lora)
        self.trainable_parameters = sum(p.numel() for p in params) + sum(p.numel() for p in critic_params)

    def update(self, rollout: Rollout, score: Tensor, step: int) -> tuple[dict[str, float], Tensor]:
        """One step; returns its metrics and a per-sequence advantage (token mean) for the completions log."""
        c = self.cfg
        kl_coef = self.kl_coef
        s, adv = ppo_update(
            self.policy, self.critic, self.reference, self.policy_optim, self.critic_optim, rollout, score, c.ppo,
            kl_coef=kl_coef, max_new_tokens=c.rollout.max_new_tokens, layout=self.layout,
            train_policy=step > c.ppo.critic_warmup_steps, seed=shuffle_seed(c.seed, step), entropy=c.entropy,
            budget=self.budget)
        if c.ppo.kl_target is not None and self.reference is not None:
            self.kl_coef = adaptive_kl_coef(kl_coef, s.kl_seq, c.ppo.kl_target, c.ppo.kl_horizon, len(score))
        mask = rollout.completion_mask
        seq_adv = (adv * mask).sum(1) / mask.sum(1).clamp(min=1)
        metrics = {k: float(v) for k, v in vars(s).items()} | {
            "kl_coef": kl_coef, "lr": self.policy_optim.lr(), "critic_lr": self.critic_optim.lr(),
            **self.budget.metrics(),
        }
        if c.ppo.critic.epochs is None or c.ppo.critic.epochs <= c.ppo.epochs:
            del metrics["value_loss_last"]
        if c.entropy.remedy == "none":
            del metrics["entropy_remedied"]
        if s.update_steps == 0:  # no update ran: no made-up zeros in the log
            metrics = {k: v for k, v in metrics.items() if k not in UPDATE_KEYS}
        return metrics, seq_adv.cpu()

    def console(self, m: dict[str, float]) -> str:
        if "value_loss" not in m:
            why = "skipped (non-finite)" if m.get("nonfinite_steps") else "none (nothing to learn from)"
            return f"kl {m['kl']:.4f}  update {why}  ev {m['explained_var']:.2f}"
        return (f"kl {m['kl']:.4f}  clip {m['clip_frac']:.3f}  vloss {m['value_loss']:.3f}  "
                f"ev {m['explained_var']:.2f}  ent {m['entropy']:.2f}")

    @staticmethod
    def resume_problem(cfg: TrainConfig, step: int) -> str | None:
        return None

    def trained(self) -> dict:
        return {"policy": (self.policy, self.policy_optim), "critic": (self.critic.container(), self.critic_optim)}

    def state(self) -> dict:
        return {"kl_coef": self.kl_coef, "micro_batch_tokens": self.budget.tokens}

    def export(self, folder: Path) -> None:
        self.critic.save(folder)

    def load(self, state: dict) -> None:
        """The KL coefficient where the adaptive controller had moved it; a token budget that out-of-memory
        errors lowered."""
        self.budget.tokens = state.get("micro_batch_tokens", self.budget.tokens)
        if self.cfg.ppo.kl_target is not None:
            self.kl_coef = state["kl_coef"]

    def load_legacy(self, folder: Path, optim_state: dict) -> None:
        """A checkpoint written before sharded state: the critic's files, both optimizers and schedulers."""
        self.critic.load(folder)
        self.policy_optim.load_state_dict(optim_state)
        self.critic_optim.load_state_dict({"optimizer": optim_state["critic_optimizer"],
                                           "scheduler": optim_state["critic_scheduler"]})
