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
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor

from grouprl.distributed import all_reduce_sum, any_rank, no_grad_sync, shard, sum_floats, world_size
from grouprl.logprobs import PASSES, forward_groups, group_rows
from grouprl.losses import Normaliser
from grouprl.microbatch import Budget, free_memory, largest_group, padded_tokens
from grouprl.optim import Optim
from grouprl.rollout import Rollout


class Learner(Protocol):
    name: str  # shown in the console and the summary ("GRPO")
    policy: torch.nn.Module  # the policy as trained (under torchrun wrapped by DDP or sharded by FSDP2)
    layout: str  # how its update lays out a batch (logprobs.LAYOUTS)
    models_trained: int  # models with their own optimizer
    models_in_memory: int  # full model copies held (a LoRA reference or a shared trunk costs none)
    trainable_parameters: int
    summary_keys: list[str]  # metrics of its own for the run summary table
    resamples_flat_groups: bool  # dynamic sampling: groups with equal rewards are dropped and refilled
    max_sampling_rounds: int
    budget: Budget  # the micro-batches' token budget (microbatch.py)

    def update(self, rollout: Rollout, score: Tensor, step: int) -> tuple[dict[str, float], Tensor]:
        """One training step on a scored batch (score: (N,)); returns its metrics and an advantage per
        sequence (N,) for the completions log."""

    def console(self, metrics: dict[str, float]) -> str:
        """Its part of the one-line step report."""

    def trained(self) -> dict[str, tuple[torch.nn.Module, Optim]]:
        """What it trains, by name: the module that holds the trained parameters and their optimizer
        (saved and restored with torch.distributed.checkpoint, sharded as the job holds them)."""

    def state(self) -> dict:
        """JSON-able state for trainer_state.json (the adaptive KL coefficient, say)."""

    def export(self, folder: Path) -> None:
        """Write what else it keeps in the Hugging Face layout (a critic) into a checkpoint folder being
        written; called on every rank (gathering sharded weights is a collective), rank 0 writes."""

    def load(self, state: dict) -> None:
        """Resume from trainer_state.json's contents, once the trained weights and optimizers are restored."""

    def load_legacy(self, folder: Path, optim_state: dict) -> None:
        """Resume from a checkpoint written before sharded state (optimizer.pt and the HF-layout files)."""


class PolicyOnly:
    """What a learner that trains the policy alone (GRPO, SFT) saves and restores: the policy with its
    optimizer, and the micro-batches' token budget (which out-of-memory errors may have lowered)."""

    policy: torch.nn.Module
    optim: Optim
    budget: Budget

    def trained(self) -> dict:
        return {"policy": (self.policy, self.optim)}

    def state(self) -> dict:
        return {"micro_batch_tokens": self.budget.tokens}

    def export(self, folder: Path) -> None:
        pass

    def load(self, state: dict) -> None:
        self.budget.tokens = state.get("micro_batch_tokens", self.budget.tokens)

    def load_legacy(self, folder: Path, optim_state: dict) -> None:
        """A checkpoint written before sharded state (optimizer.pt; the policy's weights are loaded by the loop)."""
        self.optim.load_state_dict(optim_state)


def shuffle_seed(seed: int, step: int) -> int:
    """The minibatch shuffle's seed at a step: the same on every rank and after a resume."""
    return random.Random(f"{seed}/shuffle/{step}").getrandbits(62)


@dataclass
class Passes:
    """What run_minibatches did: sums of the micro-step statistics and, per optimizer, of the gradient
    norms, both over the optimizer steps taken (a skipped minibatch adds nothing)."""

    sums: dict[str, float] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    steps: int = 0  # optimizer steps taken
    nonfinite: int = 0  # minibatches whose step was skipped for a non-finite loss or gradient norm


MicroStep = Callable[[Tensor, Normaliser], tuple[Tensor, dict[str, float]]]


def my_micro_batches(groups: Tensor, per_micro: int, rollout: Rollout | None = None,
                     budget: Budget | None = None) -> list[Tensor | None]:
    """This rank's contiguous share of `groups` (group indices), in micro-batches of per_micro groups (or by
    the token budget, see microbatch.py), padded with None to as many micro-batches as the rank with the most
    has: every rank must run as many forwards (each is a collective under FSDP2) and end on a synchronising
    backward (DDP). Every rank plans every share, so the count needs no communication."""
    n, w = len(groups), world_size()
    if budget is None or rollout is None:
        budget, rollout = Budget(), None  # no budget: by per_micro
    lo, hi = shard(n)
    mine = budget.plan(rollout, groups[lo:hi], per_micro) if hi > lo else []
    most = max(len(budget.plan(rollout, groups[r * n // w:(r + 1) * n // w], per_micro)) for r in range(w))
    return mine + [None] * (most - len(mine))


def with_backoff(budget: Budget | None, rollout: Rollout, groups: Tensor, per_micro: int,
                 models: list[torch.nn.Module], run):
    """run() (forwards and backwards over `groups`, micro-batched by `budget`), run again with half the budget
    after an out-of-memory error (one process only; see microbatch.py). run must start from scratch each time
    (no optimizer step inside)."""
    while True:
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        counted = PASSES.mark()
        try:
            return run()
        except torch.OutOfMemoryError:
            if budget is None or world_size() > 1:
                raise
            PASSES.rewind(counted)  # the failed attempt's forwards are not the step's work
            tried = max(padded_tokens(rollout, mb) for mb in budget.plan(rollout, groups, per_micro))
            free_memory(models)
            budget.halve(tried, largest_group(rollout, groups))
            torch.set_rng_state(rng[0])  # the retry draws the dropout masks the failed attempt drew
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])


@torch.no_grad()
def no_grad_rows(num_sequences: int, group_size: int, groups_per_micro: int,
                 compute: Callable[[Tensor], dict[str, Tensor]], rollout: Rollout | None = None,
                 budget: Budget | None = None) -> dict[str, Tensor]:
    """(N, C) tensors of every sequence, computed without gradients: each rank runs compute(rows) on its
    share of the groups, and the shares are summed over ranks (zeros elsewhere). A rank with fewer
    micro-batches runs the first group again and drops the result, to match the others' forwards.
    With a rollout and a budget: micro-batches by the token budget, halved on out-of-memory."""
    groups_all = torch.arange(num_sequences // group_size)

    def run() -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for groups in my_micro_batches(groups_all, groups_per_micro, rollout, budget):
            part = compute(group_rows(groups if groups is not None else torch.arange(1), group_size))
            for k, v in part.items():
                if k not in out:
                    out[k] = torch.zeros((num_sequences, *v.shape[1:]), dtype=v.dtype, device=v.device)
                if groups is not None:
                    out[k][group_rows(groups, group_size)] = v
        return out

    out = run() if rollout is None else with_backoff(budget, rollout, groups_all, groups_per_micro, [], run)
    for v in out.values():
        all_reduce_sum(v)
    return out


def sequence_logprobs(model, rollout: Rollout, groups_per_micro: int, layout: str,
                      budget: Budget | None = None) -> Tensor:
    """(N, C) logp of every completion token under `model`, without gradients."""
    return no_grad_rows(len(rollout.completions), rollout.group_size, groups_per_micro, lambda rows: {
        "logp": forward_groups(model, rollout, rows, layout=layout).logp}, rollout, budget)["logp"]


def run_minibatches(
    rollout: Rollout,
    mask: Tensor,
    *,
    epochs: int,
    minibatches: int,
    micro_batch_size: int,
    max_len: int,
    optims: list[Optim],
    models: list[torch.nn.Module],
    micro_step: MicroStep,
    shuffle_seed: int = 0,
    budget: Budget | None = None,
) -> Passes:
    """epochs x minibatches optimizer steps over the batch, each accumulated over micro-batches.

    mask: (N, C), the tokens that count (the normaliser is computed from it over each whole minibatch).
    micro_step(rows, norm) runs the forward of the sequences `rows` (whole groups) and returns the loss
    (already divided by the minibatch-wide normaliser, so micro-batches add up) and statistics to sum.
    In one process it is not called on micro-batches with no token to learn from.
    models: the (wrapped) modules trained, whose gradients are synchronised on the last micro-batch.
    shuffle_seed: minibatches > 1 draw their groups from a generator seeded with it (plus the epoch), the
    same on every rank. budget: micro-batches by a token budget, a minibatch run again with half of it after
    an out-of-memory error (microbatch.py).

    Under torchrun each rank runs its share of every minibatch (`my_micro_batches`); the loss is scaled by
    the world size because DDP and FSDP2 average gradients over ranks, and the statistics and the
    finiteness check are summed over ranks, so the step equals the one-process step on the whole batch.
    """
    g, world = rollout.group_size, world_size()
    num_groups = mask.shape[0] // g
    per_micro = max(1, micro_batch_size // g)
    out = Passes(grad_norms=[0.0] * len(optims))
    for epoch in range(epochs):
        if minibatches > 1:
            order = torch.randperm(num_groups, generator=torch.Generator().manual_seed(shuffle_seed + epoch))
        else:
            order = torch.arange(num_groups)
        for mini in order.chunk(minibatches):
            norm = Normaliser.of(mask[group_rows(mini, g)], max_len)
            if norm.num_tokens == 0:
                continue  # nothing to learn from in this minibatch: no step (it would only be momentum)

            def accumulate(mini=mini, norm=norm) -> tuple[bool, dict[str, float]]:
                for o in optims:
                    o.optimizer.zero_grad(set_to_none=True)
                finite, sums = True, {}
                passes = my_micro_batches(mini, per_micro, rollout, budget)
                for k, groups in enumerate(passes):
                    filler = groups is None or mask[group_rows(groups, g)].sum() == 0
                    if filler and world == 1:
                        continue  # every completion here is masked: no gradient to take
                    rows = group_rows(groups if groups is not None else mini[:1], g)
                    with no_grad_sync(models, sync=k == len(passes) - 1):
                        loss, stats = micro_step(rows, norm)
                        if filler:  # a pass only to keep step with the other ranks: it adds nothing
                            loss, stats = loss * 0.0, dict.fromkeys(stats, 0.0)
                        finite &= bool(torch.isfinite(loss.detach()))
                        (loss * world).backward()
                    for key, v in stats.items():
                        sums[key] = sums.get(key, 0.0) + v
                return finite, sums

            finite, sums = with_backoff(budget, rollout, mini, per_micro, models, accumulate)
            sums = sum_floats(sums, mask.device)
            norms = [_total_norm(torch.nn.utils.clip_grad_norm_(o.params, o.max_grad_norm)) for o in optims]
            if any_rank(not finite, mask.device) or not all(math.isfinite(n) for n in norms):
                out.nonfinite += 1  # skip: neither the weights nor AdamW's moments see the bad gradient
                for o in optims:
                    o.optimizer.zero_grad(set_to_none=True)
                continue
            for i, o in enumerate(optims):
                o.optimizer.step()
                o.scheduler.step()
                out.grad_norms[i] += norms[i]
            for key, v in sums.items():  # the statistics of the steps taken only
                out.sums[key] = out.sums.get(key, 0.0) + v
            out.steps += 1
    return out


def _total_norm(norm: Tensor) -> float:
    """clip_grad_norm_'s total norm as a float (under FSDP2 a replicated DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def probe_memory(policy: torch.nn.Module, rollout: Rollout, budget: Budget, groups_per_micro: int, layout: str,
                 entropy_grad: bool) -> None:
    """A forward and backward of the largest micro-batch of `rollout` (the longest batch the run can meet),
    its gradients dropped after: an out-of-memory error now halves the budget (with_backoff) before any step."""
    groups = torch.arange(len(rollout.input_ids) // rollout.group_size)

    def run() -> None:
        first = my_micro_batches(groups, groups_per_micro, rollout, budget)[0]
        rows = group_rows(first if first is not None else groups[:1], rollout.group_size)
        out = forward_groups(policy, rollout, rows, with_entropy="grad" if entropy_grad else False, layout=layout)
        loss = out.logp.sum() + (out.entropy.sum() if entropy_grad else 0.0)
        loss.backward()

    was_training = policy.training
    policy.train()  # as in the update: gradient checkpointing acts in training mode only
    try:
        with torch.random.fork_rng(devices=[rollout.input_ids.device] if rollout.input_ids.is_cuda else []):
            with_backoff(budget, rollout, groups, groups_per_micro, [policy], run)  # draws no RNG of the run's
    finally:
        policy.train(was_training)
        free_memory([policy])
