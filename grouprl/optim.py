"""AdamW with a linear learning-rate warm-up: the optimizer of every trained model (policy, critic)."""

from __future__ import annotations

import torch

from grouprl.config import OptimConfig


def make_optimizer(params: list[torch.nn.Parameter], lr: float, cfg: OptimConfig):
    """(AdamW, LambdaLR) with lr rising linearly over cfg.warmup_steps optimizer steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (warmup + 1)))
    return optimizer, scheduler
