"""AdamW with a linear learning-rate warm-up: the optimizer of every trained model (policy, critic), bundled
with its schedule and the parameters whose gradient norm it clips."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grouprl.config import OptimConfig


@dataclass
class Optim:
    """One trained model's optimizer, its learning-rate schedule, and the parameters it clips."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    max_grad_norm: float

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def make_optimizer(params: list[torch.nn.Parameter], lr: float, cfg: OptimConfig,
                   extra: tuple[list[torch.nn.Parameter], float] | None = None) -> Optim:
    """AdamW and a LambdaLR with lr rising linearly over cfg.warmup_steps optimizer steps; gradients
    clipped to cfg.max_grad_norm (over all of them). extra: (parameters, their own learning rate), a second
    parameter group (the critic's value head)."""
    groups = [{"params": params, "lr": lr}] + ([{"params": extra[0], "lr": extra[1]}] if extra else [])
    groups = [g for g in groups if g["params"]]  # (a head-only critic has no trunk group)
    params = params + (extra[0] if extra else [])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (warmup + 1)))
    return Optim(optimizer, scheduler, params, cfg.max_grad_norm)
