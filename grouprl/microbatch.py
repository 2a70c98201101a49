"""Micro-batches by a token budget, and the out-of-memory back-off.

With `max_tokens_per_micro_batch` set, a minibatch's groups are sorted longest first and packed greedily into
micro-batches whose padded size (rows x (longest prompt + longest completion) among them) stays within the
budget: sequences of like length share a micro-batch, so little is padding (forward_groups drops the columns
that are padding for every row of a micro-batch). A group larger than the budget goes alone: groups are
never split (their prompt is run once for all G completions).

On an out-of-memory error inside a minibatch's forwards and backwards (before its optimizer step) the
minibatch is run again with half the budget (the first budget, when none was set, is the size of the
micro-batch that failed). The loss of a minibatch divides by minibatch-wide counts (losses.Normaliser), so
the step is the same, micro-batches of any size, up to round-off. The halved budget is kept for the rest of
the run (and saved in checkpoints). One process only: under torchrun an out-of-memory error on one rank
leaves the others inside a collective, so it ends the job.
"""

from __future__ import annotations

import gc

import torch
from torch import Tensor

from grouprl.errors import UserError


def padded_tokens(rollout, groups: Tensor) -> int:
    """rows x (longest real prompt + longest completion) over the groups' rows: what a padded forward of
    them runs (an upper bound for the shared and packed layouts)."""
    g = rollout.group_size
    rows = (groups.unsqueeze(1) * g + torch.arange(g)).flatten()
    p = rollout.prompt_len
    att = rollout.attention_mask[rows]
    return len(rows) * int(att[:, :p].sum(1).max() + att[:, p:].sum(1).max())


class Budget:
    """The token budget of a micro-batch: None (micro_batch_size decides) until set or halved."""

    def __init__(self, tokens: int | None = None,
                 remedy: str = "lower rollout.group_size or rollout.max_new_tokens"):
        self.tokens = tokens
        self.remedy = remedy  # what a run that cannot fit one group should lower
        self.backoffs = 0  # halvings since the last `take_backoffs`

    def plan(self, rollout, groups: Tensor, groups_per_micro: int) -> list[Tensor]:
        """`groups` (indices) in micro-batches: by groups_per_micro without a budget; else longest first,
        packed greedily within the budget."""
        if self.tokens is None or len(groups) == 0:
            return list(groups.split(groups_per_micro))
        g, p = rollout.group_size, rollout.prompt_len
        att = rollout.attention_mask
        prompt = att[:, :p].sum(1).view(-1, g).max(1).values.tolist()  # per group, read once (one device sync)
        completion = att[:, p:].sum(1).view(-1, g).max(1).values.tolist()
        order = sorted((int(k) for k in groups), key=lambda k: -(prompt[k] + completion[k]))
        out, current, longest_p, longest_c = [], [], 0, 0
        for k in order:
            lp, lc = max(longest_p, prompt[k]), max(longest_c, completion[k])
            if current and (len(current) + 1) * g * (lp + lc) > self.tokens:
                out.append(torch.tensor(current))
                current, lp, lc = [], prompt[k], completion[k]
            current.append(k)
            longest_p, longest_c = lp, lc
        return out + [torch.tensor(current)] if current else out

    def halve(self, tried_tokens: int, smallest: int) -> None:
        """After an out-of-memory error on a micro-batch of `tried_tokens`: half of that (or of the budget,
        whichever is smaller). smallest: the largest single group, which cannot be split: if even the
        halved budget cannot be kept below it, the run cannot fit and a UserError says so."""
        if tried_tokens <= smallest:
            raise UserError(f"out of memory on a micro-batch of one group ({tried_tokens} tokens padded): a group "
                            f"cannot be split; {self.remedy}, turn on model.gradient_checkpointing, or use a device "
                            "with more memory")
        self.tokens = max(smallest, min(self.tokens or tried_tokens, tried_tokens) // 2)
        self.backoffs += 1

    def metrics(self) -> dict[str, float]:
        """micro_batch_tokens (when a budget is set) and oom_backoffs (this step's halvings, when any)."""
        n, self.backoffs = self.backoffs, 0
        return ({"micro_batch_tokens": float(self.tokens)} if self.tokens is not None else {}) | \
            ({"oom_backoffs": float(n)} if n else {})


def free_memory(models: list[torch.nn.Module]) -> None:
    """After an out-of-memory error: drop the gradients and what the failed forward held."""
    for m in models:
        for p in m.parameters():
            p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_group(rollout, groups: Tensor) -> int:
    return max(padded_tokens(rollout, k.view(1)) for k in groups)
