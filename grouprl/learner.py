"""What the training loop asks of an algorithm (`Learner`), and the update skeleton both algorithms share.

The loop never branches on the algorithm: it asks its learner for an update, its metrics, its state and
its rules (does it resample flat groups, may it resume at this step). A third algorithm is one new file
with a class that satisfies `Learner`, added to `LEARNERS` in loop.py.

`run_minibatches` is the one place where epochs x minibatches x micro-batches are written (CleanRL's
skeleton): batches are made of whole groups; each minibatch ends with one clipped optimizer step per
model, skipped (with a count) when a loss or a gradient norm is not finite, so one bad batch never puts
NaN into the weights or into AdamW's moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor

from grouprl.logprobs import group_rows
from grouprl.losses import Normaliser
from grouprl.optim import Optim
from grouprl.rollout import Rollout


class Learner(Protocol):
    name: str  # shown in the console and the summary ("GRPO")
    models_trained: int  # models with their own optimizer
    models_in_memory: int  # full model copies held (a LoRA reference or a shared trunk costs none)
    trainable_parameters: int
    summary_keys: list[str]  # metrics of its own for the run summary table
    resamples_flat_groups: bool  # dynamic sampling: groups with equal rewards are dropped and refilled
    max_sampling_rounds: int

    def update(self, rollout: Rollout, score: Tensor, step: int) -> tuple[dict[str, float], Tensor]:
        """One training step on a scored batch (score: (N,)); returns its metrics and an advantage per
        sequence (N,) for the completions log."""

    def console(self, metrics: dict[str, float]) -> str:
        """Its part of the one-line step report."""

    def state(self) -> dict:
        """JSON-able state for trainer_state.json (the adaptive KL coefficient, say)."""

    def optimizer_state(self) -> dict:
        """Tensors-only state of its optimizers and schedulers (optimizer.pt)."""

    def save_extra(self, folder: Path) -> None:
        """Write what else it keeps (a critic) into a checkpoint folder being written."""

    def load(self, folder: Path, optim_state: dict, state: dict) -> None:
        """Resume from a checkpoint (the policy's weights are already loaded by the loop)."""


@dataclass
class Passes:
    """What run_minibatches did: sums of the micro-step statistics and, per optimizer, of the gradient
    norms, both over the optimizer steps taken (a skipped minibatch adds nothing)."""

    sums: dict[str, float] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    steps: int = 0  # optimizer steps taken
    nonfinite: int = 0  # minibatches whose step was skipped for a non-finite loss or gradient norm


MicroStep = Callable[[Tensor, Normaliser], tuple[Tensor, dict[str, float]]]


def run_minibatches(
    rollout: Rollout,
    mask: Tensor,
    *,
    epochs: int,
    minibatches: int,
    micro_batch_size: int,
    max_len: int,
    optims: list[Optim],
    micro_step: MicroStep,
) -> Passes:
    """epochs x minibatches optimizer steps over the batch, each accumulated over micro-batches.

    mask: (N, C), the tokens that count (the normaliser is computed from it over each minibatch).
    micro_step(rows, norm) runs the forward of the sequences `rows` (whole groups) and returns the loss
    (already divided by the minibatch-wide normaliser, so micro-batches add up) and statistics to sum.
    It is not called on micro-batches with no token to learn from.
    """
    g = rollout.group_size
    num_groups = mask.shape[0] // g
    per_micro = max(1, micro_batch_size // g)
    out = Passes(grad_norms=[0.0] * len(optims))
    for _ in range(epochs):
        order = torch.randperm(num_groups) if minibatches > 1 else torch.arange(num_groups)
        for mini in order.chunk(minibatches):
            norm = Normaliser.of(mask[group_rows(mini, g)], max_len)
            for o in optims:
                o.optimizer.zero_grad(set_to_none=True)
            finite, sums = True, {}
            for groups in mini.split(per_micro):
                rows = group_rows(groups, g)
                if mask[rows].sum() == 0:
                    continue  # every completion here is masked: no gradient to take
                loss, stats = micro_step(rows, norm)
                finite &= bool(torch.isfinite(loss.detach()))
                loss.backward()
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
            if not sums:
                continue  # nothing to learn from in this minibatch: no step (it would only be momentum)
            norms = [float(torch.nn.utils.clip_grad_norm_(o.params, o.max_grad_norm)) for o in optims]
            if not finite or not all(math.isfinite(n) for n in norms):
                out.nonfinite += 1  # skip: neither the weights nor AdamW's moments see the bad gradient
                for o in optims:
                    o.optimizer.zero_grad(set_to_none=True)
                continue
            for i, o in enumerate(optims):
                o.optimizer.step()
                o.scheduler.step()
                out.grad_norms[i] += norms[i]
            for k, v in sums.items():  # the statistics of the steps taken only
                out.sums[k] = out.sums.get(k, 0.0) + v
            out.steps += 1
    return out
