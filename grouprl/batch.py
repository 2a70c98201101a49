"""Batch assembly and scoring: the prompt stream, G completions per prompt, every reward function, and
dynamic sampling's refill of flat groups. Produces the `Scored` batch that a learner updates on.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from grouprl.advantages import zero_std_groups
from grouprl.config import TrainConfig
from grouprl.distributed import gather_results, gathered, shard, world_size
from grouprl.episodes import Episode, Setup, sample as sample_episodes
from grouprl.rewards import RewardSet
from grouprl.rollout import Rollout, concat, select
from grouprl.tasks import Task


class PromptStream:
    """Training rows in a seeded order, epoch after epoch. Its position (epoch, index) is all a resume needs.
    With `in_order`, the first epoch keeps the task's order (a curriculum); later epochs are shuffled."""

    def __init__(self, rows: list[dict], seed: int, in_order: bool, epoch: int = 0, index: int = 0):
        self.rows, self.seed, self.in_order = rows, seed, in_order
        self.epoch, self.index = epoch, index
        self._order = self._order_for(epoch)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if not (self.in_order and epoch == 0):
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._order_for(self.epoch)
            out.append(self.rows[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


@dataclass
class Scored:
    rollout: Rollout
    rows: list[dict]  # one per sequence
    prompts: list[str]  # one per sequence
    per_fn: torch.Tensor  # (N, K) each reward function
    total: torch.Tensor  # (N,) weighted sum
    zero_std_frac: float  # over every group sampled this step, dropped ones included
    gen_seconds: float = 0.0
    score_seconds: float = 0.0
    generated_tokens: float = 0.0
    sample_passes: float = 0.0  # token-passes of sampling: the prompts' prefill and one per generated token
    episodes: list | None = None  # one episodes.Episode per sequence, with an environment


def columns_of(rows: list[dict]) -> dict:
    """Reward keyword arguments: every column but the prompt, one value per sequence."""
    return {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}


def check_rewards(rewards: RewardSet, task: Task, tokenizer, prefill: str, episodes: bool = False) -> None:
    """Call every reward on two training rows before any work, so a broken function fails fast. The probe
    completions are neutral text (not the answer format), which every reward must be able to score; with
    `episodes`, each comes with an empty episode record."""
    rows = (task.train * 2)[:2]
    prompts = [task.chat_prompt(tokenizer, r, prefill) for r in rows]
    completions = [prefill + "ok", prefill]
    ids = [tokenizer(c[len(prefill):], add_special_tokens=False)["input_ids"] for c in completions]
    extra = {"episode": [Episode(messages=[{"role": "assistant", "content": c}]).record() for c in completions]} \
        if episodes else {}
    rewards.score(prompts, completions, columns_of(rows) | extra, ids)


def sampling_seed(seed: int, step: int, round_: int, prompt: int) -> int:
    """The generator seed of one prompt's group: a function of the run's seed and the prompt's place in the
    step, not of the rank that samples it, so a step's completions are the same at any world size."""
    return random.Random(f"{seed}/{step}/{round_}/{prompt}").getrandbits(63)


def _to(r: Rollout, device) -> Rollout:
    tensors = {k: getattr(r, k).to(device) for k in ("input_ids", "attention_mask", "completion_mask", "truncated",
                                                     "logprobs", "turn_rewards") if getattr(r, k) is not None}
    return r._replace(**tensors)


def _sample_slice(policy, tokenizer, task: Task, rewards: RewardSet, rows: list[dict], cfg: TrainConfig,
                  seeds: list[int], device: torch.device, env: Setup | None) -> Scored:
    """G completions (episodes, with an environment) for each of `rows` (this rank's slice of a round), scored;
    under torchrun the tensors are moved to the CPU to be gathered."""
    ro = cfg.rollout
    t0 = time.perf_counter()
    rows, prompts, rollout, episodes = sample_episodes(
        policy, tokenizer, task, rows, ro.group_size, cfg.task.prefill, env, max_new_tokens=ro.max_new_tokens,
        temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, seeds=seeds, device=device, engine=ro.engine,
        static_cache=ro.static_cache, compile=ro.compile)
    t1 = time.perf_counter()
    seq_rows = [rows[i] for i in rollout.prompt_index]
    seq_prompts = [prompts[i] for i in rollout.prompt_index]
    ids = [row[:n].tolist() for row, n in zip(rollout.input_ids[:, rollout.prompt_len:].cpu(),
                                              rollout.spans.long().tolist())]
    extra = {"episode": [e.record() for e in episodes]} if episodes is not None else {}
    per_fn, total = rewards.score(seq_prompts, rollout.completions, columns_of(seq_rows) | extra, ids)
    if rollout.turn_rewards is not None:  # as weighted in the total (PPO puts each on its own turn)
        rollout = rollout._replace(turn_rewards=rollout.turn_rewards * rewards.weight_of("env"))
    gatherable = _to(rollout, "cpu") if world_size() > 1 else rollout  # pickled for the other ranks
    prompt_tokens = rollout.attention_mask[::ro.group_size, :rollout.prompt_len].sum().item()
    generated = rollout.lengths.sum().item()
    prefilled = sum(e.prefilled for e in episodes) if episodes is not None else 0
    return Scored(gatherable, seq_rows, seq_prompts, per_fn, total, 0.0, gen_seconds=t1 - t0,
                  score_seconds=time.perf_counter() - t1, generated_tokens=generated,
                  sample_passes=rollout.prefills * prompt_tokens + prefilled + generated, episodes=episodes)


def _sample_round(policy, tokenizer, task: Task, rewards: RewardSet, rows: list[dict], cfg: TrainConfig,
                  seeds: list[int], device: torch.device, env: Setup | None) -> Scored:
    """The whole round on every rank: each rank samples and scores its contiguous slice of `rows`, then all
    slices are gathered in rank order. A rank's error becomes the same UserError on every rank."""
    lo, hi = shard(len(rows))

    def my_slice() -> Scored | None:
        with gathered(policy) as model:  # a collective under FSDP2: every rank enters, with or without rows
            if hi > lo:
                return _sample_slice(model, tokenizer, task, rewards, rows[lo:hi], cfg, seeds[lo:hi], device, env)
        return None

    done = [p for p in gather_results(my_slice) if p is not None]
    return Scored(
        rollout=concat([p.rollout for p in done], tokenizer.pad_token_id),
        rows=[r for p in done for r in p.rows], prompts=[q for p in done for q in p.prompts],
        per_fn=torch.cat([p.per_fn for p in done]), total=torch.cat([p.total for p in done]), zero_std_frac=0.0,
        gen_seconds=max(p.gen_seconds for p in done), score_seconds=max(p.score_seconds for p in done),
        generated_tokens=sum(p.generated_tokens for p in done), sample_passes=sum(p.sample_passes for p in done),
        episodes=None if done[0].episodes is None else [e for p in done for e in p.episodes],
    )


def sample_and_score(policy, tokenizer, task: Task, rewards: RewardSet, stream: PromptStream, cfg: TrainConfig,
                     step: int, device: torch.device, resample_flat: bool = False, max_rounds: int = 1,
                     env: Setup | None = None) -> Scored:
    """Generate G completions for prompts_per_step prompts and score them. With resample_flat (dynamic
    sampling), groups whose rewards are all equal are dropped and more prompts are sampled, up to
    max_rounds generation rounds. Under torchrun every rank returns the same whole batch (see distributed.py);
    the prompts are shared out and the counts that decide a refill are those of the whole batch.
    device: where the batch goes (the model's compute device; under FSDP2 CPU offload its sharded weights
    are elsewhere). env: the environment of multi-turn episodes (episodes.setup), or None."""
    ro, g = cfg.rollout, cfg.rollout.group_size
    kept: list[Scored] = []
    groups_seen = groups_flat = 0
    n_kept = 0
    t_gen = t_score = tokens = passes = 0.0
    for round_ in range(max_rounds if resample_flat else 1):
        rows = stream.take(ro.prompts_per_step - n_kept if resample_flat else ro.prompts_per_step)
        seeds = [sampling_seed(cfg.seed, step, round_, i) for i in range(len(rows))]
        got = _sample_round(policy, tokenizer, task, rewards, rows, cfg, seeds, device, env)
        t_gen += got.gen_seconds
        t_score += got.score_seconds
        tokens += got.generated_tokens
        passes += got.sample_passes  # dropped groups cost their sampling too
        flat = zero_std_groups(got.total, g)  # (B,)
        groups_seen += len(rows)
        groups_flat += int(flat.sum())
        keep = ~flat.repeat_interleave(g) if resample_flat else torch.ones(len(got.total), dtype=torch.bool)
        if keep.any():
            idx = keep.nonzero().flatten()
            kept.append(Scored(select(got.rollout, keep), [got.rows[i] for i in idx], [got.prompts[i] for i in idx],
                               got.per_fn[keep], got.total[keep], 0.0,
                               episodes=None if got.episodes is None else [got.episodes[i] for i in idx]))
            n_kept += int(keep.sum()) // g
        if n_kept >= ro.prompts_per_step:
            break
    if not kept:  # every group was flat: train on the last one anyway (zero advantages, only the KL acts)
        kept.append(got)
    return Scored(
        rollout=_to(concat([k.rollout for k in kept], tokenizer.pad_token_id), device),
        rows=[r for k in kept for r in k.rows],
        prompts=[p for k in kept for p in k.prompts],
        per_fn=torch.cat([k.per_fn for k in kept]),
        total=torch.cat([k.total for k in kept]),
        zero_std_frac=groups_flat / max(groups_seen, 1),
        gen_seconds=t_gen, score_seconds=t_score, generated_tokens=tokens, sample_passes=passes,
        episodes=None if kept[0].episodes is None else [e for k in kept for e in k.episodes],
    )
