"""The GRPO update: given a scored rollout, mu passes of the clipped objective with a k3 KL to pi_ref.

Read top to bottom: behaviour logprobs (only when mu > 1), reference logprobs (only when beta > 0), then
for each of mu passes and each minibatch, micro-batched forward/backward and one optimizer step.
With mu = 1 and one minibatch, logp_old = logp_theta.detach() and no extra forward is run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from grouprl.advantages import ADVANTAGES
from grouprl.config import EntropyConfig, GRPOConfig, TrainConfig
from grouprl.distributed import wrap
from grouprl.entropy import select_tokens
from grouprl.learner import PolicyOnly, run_minibatches, sequence_logprobs, shuffle_seed
from grouprl.logprobs import attention, forward_groups, pick_layout
from grouprl.losses import EntropyControl, Normaliser, grpo_loss
from grouprl.microbatch import Budget
from grouprl.models import Reference, trainable_parameters
from grouprl.optim import Optim, make_optimizer
from grouprl.rollout import Rollout


@dataclass
class UpdateStats:
    """Token means over the batch (loss and grad_norm: means over optimizer steps). None where no update
    ran (a batch with no signal), so that plots are not bent by made-up zeros."""

    loss: float | None = None
    kl: float | None = None
    clip_frac: float | None = None
    ratio: float | None = None
    entropy: float | None = None
    remedied: float | None = None  # fraction of the tokens the entropy remedy acted on
    grad_norm: float | None = None
    tokens: float = 0.0
    prep_time: float = 0.0  # seconds in the no-grad forwards (pi_old, pi_ref)
    nonfinite_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm


def grpo_update(
    policy: torch.nn.Module,
    reference: Reference | None,
    optim: Optim,
    rollout: Rollout,
    adv: Tensor,
    cfg: GRPOConfig,
    *,
    max_new_tokens: int,
    layout: str = "shared",
    seed: int = 0,
    entropy: EntropyConfig = EntropyConfig(),
    budget: Budget | None = None,
) -> UpdateStats:
    """Run mu x minibatches optimizer steps on the batch. adv: (N,). Returns token-weighted means.

    Rows come in groups of G that share a prompt; minibatches and micro-batches are made of whole groups.
    seed: the minibatch shuffle's (see run_minibatches) and clip_cov's draw. entropy: the bonus and the
    covariance remedy, whose tokens are picked from pi_old over the whole batch (so pi_old is computed).
    budget: micro-batches by tokens, halved on out-of-memory (microbatch.py).
    """
    mask = rollout.completion_mask.clone()  # (N, C)
    adv = adv.to(mask.device)  # rewards are scored on the CPU
    if not adv.any() and (reference is None or cfg.beta == 0) and not entropy.coef:
        return UpdateStats()  # every group flat, no KL, no bonus: a step would only be AdamW momentum
    if cfg.mask_truncated:
        mask[rollout.truncated] = 0.0
    per_micro = max(1, cfg.micro_batch_size // rollout.group_size)
    t0 = time.perf_counter()
    policy.eval()  # pi_old and pi_ref without dropout
    old_logp = None
    if cfg.mu > 1 or cfg.minibatches > 1 or entropy.remedy != "none":  # pi_old: before this step's first update
        old_logp = sequence_logprobs(policy, rollout, per_micro, layout, budget)
    selected = None if old_logp is None else select_tokens(
        entropy.remedy, old_logp, adv, mask, ratio=entropy.cov_ratio, bounds=entropy.clip_cov_bounds, seed=seed)
    ref_logp = None
    if reference is not None and cfg.beta > 0:
        with reference.active() as ref_model:
            ref_logp = sequence_logprobs(ref_model, rollout, per_micro, layout, budget)
    policy.train()
    prep_time = time.perf_counter() - t0

    def micro_step(rows: Tensor, norm: Normaliser) -> tuple[Tensor, dict[str, float]]:
        m = mask[rows]
        out = forward_groups(policy, rollout, rows, with_entropy="grad" if entropy.coef else True, layout=layout)
        on_policy = cfg.mu == 1 and cfg.minibatches == 1  # pi_old is this forward's own logp (old_logp: selection only)
        old = out.logp.detach() if on_policy or old_logp is None else old_logp[rows]
        ref = ref_logp[rows] if ref_logp is not None else None
        control = EntropyControl(entropy.remedy, None if selected is None else selected[rows], entropy.kl_cov_coef,
                                 entropy.coef, out.entropy)
        loss, s = grpo_loss(out.logp, old, ref, adv[rows], m, norm, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                            beta=cfg.beta, ratio_type=cfg.ratio, aggregation=cfg.loss_agg, control=control)
        return loss, {"loss": loss.item(), "kl": s.kl, "clipped": s.clipped, "ratio": s.ratio, "remedied": s.remedied,
                      "entropy": (out.entropy.detach() * m).sum().item(), "tokens": s.tokens}

    p = run_minibatches(rollout, mask, epochs=cfg.mu, minibatches=cfg.minibatches,
                        micro_batch_size=cfg.micro_batch_size, max_len=max_new_tokens, optims=[optim],
                        models=[policy], micro_step=micro_step, shuffle_seed=seed, budget=budget)
    if p.steps == 0:
        return UpdateStats(prep_time=prep_time, nonfinite_steps=p.nonfinite)
    s, tokens = p.sums, max(p.sums["tokens"], 1.0)
    return UpdateStats(
        loss=s["loss"] / p.steps, kl=s["kl"] / tokens, clip_frac=s["clipped"] / tokens, ratio=s["ratio"] / tokens,
        entropy=s["entropy"] / tokens, remedied=s["remedied"] / tokens if entropy.remedy != "none" else None,
        grad_norm=p.grad_norms[0] / p.steps, tokens=s["tokens"] / p.steps,
        prep_time=prep_time, nonfinite_steps=p.nonfinite,
    )


class GRPO(PolicyOnly):
    """GRPO for the training loop: advantages, the reference (when beta > 0) and the optimizer."""

    name = "GRPO"
    summary_keys = ["kl", "entropy"]

    def __init__(self, cfg: TrainConfig, policy: torch.nn.Module):
        """policy: the model as loaded; under torchrun it is wrapped here (after the reference is copied and
        before the optimizer is built on the parameters, sharded under FSDP2)."""
        self.cfg = cfg
        self.layout = pick_layout(cfg.model.update_layout, cfg.model.gradient_checkpointing, attention(policy))
        self.reference = Reference(policy, cfg.model.lora.enabled) if cfg.grpo.beta > 0 else None
        if self.reference is not None and not self.reference.lora:
            self.reference.model = wrap(self.reference.model, cfg.distributed, trainable=False)
        self.policy = wrap(policy, cfg.distributed)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optim = make_optimizer(params, cfg.optim.lr, cfg.optim)
        self.models_trained = 1
        self.models_in_memory = 1 + (self.reference is not None and not self.reference.lora)
        self.trainable_parameters = trainable_parameters(policy)
        self.resamples_flat_groups = cfg.grpo.dynamic_sampling
        self.max_sampling_rounds = cfg.grpo.max_sampling_rounds
        self.budget = Budget(cfg.max_tokens_per_micro_batch)

    @staticmethod
    def resume_problem(cfg: TrainConfig, step: int) -> str | None:
        """Why a checkpoint after `step` cannot be resumed exactly, or None: a refreshed reference is not
        saved, so only a checkpoint at a refresh can be."""
        k = cfg.grpo.ref_refresh_steps if cfg.grpo.beta > 0 else 0
        if k and step % k:
            return (f"cannot resume exactly after step {step}: the reference was last refreshed at step "
                    f"{step // k * k} and is not saved; resume from a checkpoint at a multiple of "
                    f"grpo.ref_refresh_steps={k}")
        return None

    def update(self, rollout: Rollout, score: Tensor, step: int) -> tuple[dict[str, float], Tensor]:
        """One step; returns its metrics and the advantages (N,)."""
        c = self.cfg
        adv = ADVANTAGES[c.grpo.advantage](score, rollout.group_size, c.grpo.eps_std)  # (N,)
        upd = grpo_update(self.policy, self.reference, self.optim, rollout, adv, c.grpo,
                          max_new_tokens=c.rollout.max_new_tokens, layout=self.layout,
                          seed=shuffle_seed(c.seed, step), entropy=c.entropy, budget=self.budget)
        if self.reference is not None and c.grpo.ref_refresh_steps and step % c.grpo.ref_refresh_steps == 0:
            self.reference.refresh(self.policy)
        metrics = {"kl": upd.kl, "clip_frac": upd.clip_frac, "ratio": upd.ratio, "entropy": upd.entropy,
                   "entropy_remedied": upd.remedied, "loss": upd.loss, "grad_norm": upd.grad_norm, "prep_time": upd.prep_time,
                   "nonfinite_steps": upd.nonfinite_steps, "lr": self.optim.lr(),
                   **self.budget.metrics()}
        return {k: v for k, v in metrics.items() if v is not None}, adv

    def console(self, m: dict[str, float]) -> str:
        if "loss" not in m:
            return "update skipped (non-finite)" if m.get("nonfinite_steps") else "no update (no signal)"
        return f"kl {m['kl']:.4f}  clip {m['clip_frac']:.3f}  ent {m['entropy']:.2f}"

    def load(self, state: dict) -> None:
        """After the trained weights and optimizer are restored: a reference refreshed every K steps was
        refreshed at exactly this step (see resume_problem)."""
        super().load(state)
        if self.reference is not None and self.cfg.grpo.ref_refresh_steps:
            self.reference.refresh(self.policy)
