"""Can a critic predict returns on prompts it has never seen, given far more training than PPO gives it?

Fits the critic that a config describes (its kind, LoRA, learning rates) to the logged completions of steps
--train of a run, for --epochs passes (target: the sequence reward R at every completion token, as a
critic with lambda = 1 learns; two optimizer steps per logged step, as the compare config's PPO takes), and
after each pass measures V on steps --test, whose prompts it has not seen (a run never repeats a prompt).
Online PPO fits each batch once before the next brings new prompts; this gives the same critic many passes
over the same amount of data, so it bounds what more critic training (epochs, replay) could buy.

    python benchmarks/critic_heldout.py --run runs/compare/main/runs/ppo/seed-0 --train 11-30 --test 31-40 \
        --epochs 5 --set ppo.critic.lr=5e-4

Prints, after each pass, the training loss and the explained variance on the test steps: pooled over all of
their tokens and the mean of the per-step figures, each against R (lambda 1) and against the GAE(0.95)
returns built from V itself (the figure PPO logs).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from critic_fit import rollout_from_log


def steps_of(text: str) -> list[int]:
    a, _, b = text.partition("-")
    return list(range(int(a), int(b or a) + 1))


def explained(v: torch.Tensor, r: torch.Tensor) -> float:
    return float(1 - (r - v).var() / r.var()) if r.var() > 0 else math.nan


def main() -> None:
    from grouprl.advantages import gae
    from grouprl.config import load_config
    from grouprl.critic import load_critic
    from grouprl.logprobs import forward_groups
    from grouprl.models import load_policy
    from grouprl.ppo import critic_optimizer
    from grouprl.tasks import build_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run's output_dir (its completions.jsonl)")
    ap.add_argument("--config", type=Path, default=Path("configs/compare.yaml"))
    ap.add_argument("--train", default="11-30", help="logged steps to fit, 'a-b'")
    ap.add_argument("--test", default="31-40", help="logged steps to measure on, 'a-b'")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, ["algo=ppo", "ppo.kl_coef=0", *a.set])
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    policy, tok = load_policy(cfg.model)
    critic = load_critic(cfg, policy)
    optim = critic_optimizer(cfg, critic)
    logged = [json.loads(x) for x in (a.run / "completions.jsonl").read_text().splitlines() if x.strip()]

    def batch(step: int):
        rows = [r for r in logged if r["step"] == step]
        return rollout_from_log(rows, tok, task, cfg), torch.tensor([r["reward"] for r in rows])

    train, test = [batch(s) for s in steps_of(a.train)], [batch(s) for s in steps_of(a.test)]

    def values(ro, rows: torch.Tensor) -> torch.Tensor:
        return critic.head(forward_groups(critic.model, ro, rows, with_logp=False, with_hidden=True).hidden)

    def measure() -> dict[str, float]:
        critic.train(False)
        per_step, pooled = {"lam1": [], "gae": []}, {"v": [], "lam1": [], "gae": []}
        for ro, score in test:
            m = ro.completion_mask
            with torch.no_grad():
                v = values(ro, torch.arange(len(score))) * m
            last = torch.zeros_like(m)
            last[torch.arange(len(score)), m.sum(1).long() - 1] = 1.0
            targets = {"lam1": score[:, None] * m, "gae": gae(score[:, None] * last, v, m, 1.0, 0.95)[1]}
            keep = m > 0
            pooled["v"].append(v[keep])
            for k, r in targets.items():
                per_step[k].append(explained(v[keep], r[keep]))
                pooled[k].append(r[keep])
        critic.train(True)
        v = torch.cat(pooled["v"])
        out = {f"pooled_{k}": explained(v, torch.cat(pooled[k])) for k in per_step}
        return out | {f"per_step_{k}": statistics.mean(x for x in xs if not math.isnan(x)) for k, xs in per_step.items()}

    print("before:", {k: round(x, 3) for k, x in measure().items()}, flush=True)
    g = cfg.rollout.group_size
    for epoch in range(1, a.epochs + 1):
        t0, losses = time.perf_counter(), []
        for i in torch.randperm(len(train)).tolist():
            ro, score = train[i]
            m = ro.completion_mask
            for rows in torch.arange(len(score)).split(len(score) // cfg.ppo.minibatches // g * g):
                v = values(ro, rows)
                loss = 0.5 * (((v - score[rows, None]) ** 2) * m[rows]).sum() / m[rows].sum()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(optim.params, optim.max_grad_norm)
                optim.optimizer.step()
                optim.optimizer.zero_grad()
                losses.append(loss.item())
        print(f"epoch {epoch}: train loss {statistics.mean(losses):.3f} ({time.perf_counter() - t0:.0f} s), "
              f"test: {({k: round(x, 3) for k, x in measure().items()})}", flush=True)


if __name__ == "__main__":
    main()
