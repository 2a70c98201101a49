"""Held-out evaluation: strict-format rate, greedy accuracy (pass@1), and pass@k / maj@k with sampling.

Accuracy uses the task's correctness reward, so an answer counts only when it is inside <answer> tags.
`answer_anywhere` (the last number anywhere in the completion is right) is reported beside it, to tell
gains in arithmetic from gains in format.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grouprl.distributed import gather_results, gathered, shard
from grouprl.episodes import Setup, sample as sample_episodes
from grouprl.errors import UserError
from grouprl.rewards import RewardSet, answer_anywhere, extract_answer, strict_format
from grouprl.tasks import Task
from grouprl.verification import tool_checked

def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    rows: list[dict],
    *,
    prefill: str,
    max_new_tokens: int,
    k: int = 1,
    temperature: float = 0.8,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    engine: str = "auto",
    correctness: str | None = None,
    env: Setup | None = None,
) -> tuple[dict, list[dict]]:
    """Returns (metrics, samples). Metrics: format_rate, accuracy, answer_anywhere, mean_length_chars and,
    when k > 1, pass@k and maj@k over k samples at `temperature`. engine: what samples (engines.pick).
    correctness: the reward (any reward name, 1 = right) whose mean is the accuracy; default the task's.
    env: run episodes with this environment (episodes.setup, whose task this is); the completion scored is
    each episode's last model turn, and turns, tool_calls and tool_checked (greedy means) are added."""
    if k > batch_size:  # one problem's k samples are drawn at once
        raise UserError(f"eval k={k} is more than eval.batch_size={batch_size}, the completions sampled at once: "
                        f"raise eval.batch_size to at least {k} (memory permitting) or lower k")
    scorer = RewardSet([(correctness or task.correctness, 1.0)])
    try:
        return _evaluate(model, tokenizer, task, rows, prefill, max_new_tokens, k, temperature, batch_size, on_batch,
                         engine, scorer, env)
    finally:
        scorer.close()


def _evaluate(model, tokenizer, task, rows, prefill, max_new_tokens, k, temperature, batch_size, on_batch, engine,
              scorer: RewardSet, env: Setup | None) -> tuple[dict, list[dict]]:
    def call_reward(_name, _fn, prompts, completions, columns):
        return scorer.score(prompts, completions, columns)[0][:, 0].tolist()

    def sample(batch: list[dict], group_size: int, **kw) -> tuple[list[dict], list[str], list[str], list | None]:
        """(rows, prompts, completions, episodes or None) of G samples per row (episodes, with an environment,
        whose reset may have given a row its prompt); one prompt per sample."""
        used, texts, out, episodes = sample_episodes(model, tokenizer, task, batch, group_size, prefill, env,
                                                     max_new_tokens=max_new_tokens, engine=engine, **kw)
        if on_batch:
            on_batch(len(out.completions))
        return used, [t for t in texts for _ in range(group_size)], out.completions, episodes

    correct_fn = None
    columns = {key: [r.get(key) for r in rows] for key in rows[0] if key != "prompt"}
    start = time.perf_counter()
    greedy: list[str] = []
    prompts: list[str] = []
    episodes: list = []
    shown: list[dict] = []
    for s in range(0, len(rows), batch_size):
        used, texts, completions, eps = sample(rows[s:s + batch_size], 1, greedy=True)
        shown += used
        prompts += texts
        greedy += completions
        episodes += eps or []
    fmt = strict_format(prompts, greedy)
    records = {"episode": [e.record() for e in episodes]} if episodes else {}
    right = call_reward(task.correctness, correct_fn, prompts, greedy, columns | records)
    anywhere = answer_anywhere(prompts, greedy, [str(r.get("answer", "")) for r in rows])
    n = len(rows)
    metrics = {
        "problems": n,
        "format_rate": sum(fmt) / n,
        "accuracy": sum(right) / n,
        "answer_anywhere": sum(anywhere) / n,
        "mean_length_chars": sum(len(c) for c in greedy) / n,
    }
    samples = [{"prompt": r["prompt"], "answer": r.get("answer"), "completion": c, "format": f, "correct": a}
               for r, c, f, a in zip(shown, greedy, fmt, right)]
    if episodes:
        metrics |= {"turns": sum(e.turns for e in episodes) / n, "tool_calls": sum(e.tool_calls for e in episodes) / n,
                    "tool_checked": sum(tool_checked(e.messages) for e in episodes) / n}
        for sample_, e in zip(samples, episodes):
            sample_ |= e.summary()
    if k > 1:
        hits, majority = 0, 0
        per_batch = max(1, batch_size // k)
        for s in range(0, n, per_batch):
            batch = rows[s:s + per_batch]
            _, rep_prompts, completions, eps = sample(batch, k, temperature=temperature)
            cols = {key: [v for v in vals[s:s + per_batch] for _ in range(k)] for key, vals in columns.items()}
            if eps:
                cols["episode"] = [e.record() for e in eps]
            ok = call_reward(task.correctness, correct_fn, rep_prompts, completions, cols)
            for j in range(len(batch)):
                group = completions[j * k:(j + 1) * k]
                hits += any(ok[j * k:(j + 1) * k])
                votes = Counter(a for a in (extract_answer(c) for c in group) if a)
                if votes:
                    top = votes.most_common(1)[0][0]
                    idx = next(i for i, c in enumerate(group) if extract_answer(c) == top)
                    majority += bool(ok[j * k + idx])
        metrics[f"pass@{k}"] = hits / n
        metrics[f"maj@{k}"] = majority / n
    metrics["seconds"] = time.perf_counter() - start
    return metrics, samples


def evaluate_while_training(policy, tokenizer, task: Task, cfg, step: int, device: torch.device,
                            env: Setup | None = None) -> dict:
    """The held-out evaluation of `eval_every`: the first eval.num_problems held-out rows, greedy (and pass@k /
    maj@k when eval.k > 1), on the training engine. Under torchrun each rank evaluates a contiguous share and
    the metrics (means over problems) are combined weighted by problems: every rank returns the same dict.

    Sampling for pass@k draws from a generator seeded by (seed, step) inside a forked RNG, so a run with
    evaluations trains exactly as one without (and a resumed run as an uninterrupted one)."""
    rows = task.eval[: cfg.eval.num_problems]
    lo, hi = shard(len(rows))
    cuda = [device] if device.type == "cuda" else []

    def my_share() -> dict | None:
        with torch.random.fork_rng(devices=cuda), gathered(policy) as model:
            torch.manual_seed(random.Random(f"{cfg.seed}/eval/{step}").getrandbits(63))
            if hi > lo:
                return evaluate(model, tokenizer, task, rows[lo:hi], prefill=cfg.task.prefill,
                                max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, k=cfg.eval.k,
                                temperature=cfg.eval.temperature, batch_size=cfg.eval.batch_size,
                                engine=cfg.rollout.engine, correctness=cfg.eval.reward, env=env)[0]
        return None

    return combine([m for m in gather_results(my_share) if m is not None])


def combine(parts: list[dict]) -> dict:
    """Metrics of disjoint shares of the problems as the metrics of all of them: each mean weighted by its
    share's problems; seconds: the slowest share's."""
    n = sum(p["problems"] for p in parts)
    out = {"problems": n}
    for key in parts[0]:
        if key == "seconds":
            out[key] = max(p[key] for p in parts)
        elif key != "problems":
            out[key] = sum(p[key] * p["problems"] for p in parts) / n
    return out
