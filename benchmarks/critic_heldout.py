"""Can a critic predict returns on prompts it has never seen, given far more training than PPO gives it?

Fits the critic that a config describes (its kind, LoRA, learning rates; default: the run's own config) to
the logged completions of steps --train of a run, for --epochs passes (target: the sequence reward R at every
completion token, as a critic with lambda = 1 learns; ppo.minibatches optimizer steps per logged step, the
loss weighted by ppo.vf_coef and clipped as in PPO), and after each pass measures V on steps --test, whose
prompts it has not seen (a run never repeats a prompt).
Online PPO fits each batch once before the next brings new prompts; this gives the same critic many passes
over the same amount of data, so it bounds what more critic training (epochs, replay) could buy.

    python benchmarks/critic_heldout.py --run runs/compare/main/runs/ppo/seed-0 --train 11-30 --test 31-40 \
        --epochs 5 --set ppo.critic.lr=5e-4

Prints, after each pass, the training loss and the explained variance on the test steps: pooled over all of
their tokens and the mean of the per-step figures (steps whose completions all scored the same are left out
and counted), each against R (lambda 1: how well V predicts the outcome) and against the GAE returns built
from V itself (the figure PPO logs; they lean on V's own later values, so a V that only agrees with itself
along a completion scores well there too). A critic of kind head is fitted by its head alone (its trunk is
the policy's, which PPO would also move).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from critic_fit import logged_batch


def steps_of(text: str) -> list[int]:
    """'11-30' -> [11, ..., 30]; '31' -> [31]."""
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> None:
    from grouprl.advantages import gae
    from grouprl.config import load_config
    from grouprl.critic import load_critic
    from grouprl.losses import explained_variance
    from grouprl.models import load_policy
    from grouprl.ppo import critic_optimizer
    from grouprl.tasks import build_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a run's output_dir (its completions.jsonl)")
    ap.add_argument("--config", type=Path, default=None, help="default: the run's config.yaml")
    ap.add_argument("--train", default="11-30", help="logged steps to fit, 'a-b'")
    ap.add_argument("--test", default="31-40", help="logged steps to measure on, 'a-b'")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config or args.run / "config.yaml", ["algo=ppo", "ppo.kl_coef=0", *args.set])
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task)
    policy, tok = load_policy(cfg.model)
    critic = load_critic(cfg, policy)
    optim = critic_optimizer(cfg, critic)
    logged = [json.loads(x) for x in (args.run / "completions.jsonl").read_text().splitlines() if x.strip()]
    train = [logged_batch(logged, s, tok, task, cfg) for s in steps_of(args.train)]
    test = [logged_batch(logged, s, tok, task, cfg) for s in steps_of(args.test)]

    def measure() -> dict[str, float]:
        critic.train(False)
        per_step, pooled = {"lam1": [], "gae": []}, {"v": [], "m": [], "lam1": [], "gae": []}
        for ro, score in test:
            m = ro.completion_mask  # (N, C)
            with torch.no_grad():
                v = critic.values(ro, torch.arange(len(score)), "shared") * m
            last = torch.zeros_like(m)
            last[torch.arange(len(score)), m.sum(1).long() - 1] = 1.0
            returns = gae(score[:, None] * last, v, m, cfg.ppo.gamma, cfg.ppo.lam)[1]
            targets = {"lam1": score[:, None] * m, "gae": returns}
            pooled["v"].append(v.flatten())
            pooled["m"].append(m.flatten())
            for k, r in targets.items():
                if score.var() > 0:
                    per_step[k].append(explained_variance(v, r, m))
                pooled[k].append(r.flatten())
        critic.train(True)
        v, m = torch.cat(pooled["v"]), torch.cat(pooled["m"])
        out = {f"pooled_{k}": explained_variance(v, torch.cat(pooled[k]), m) for k in per_step}
        return out | {f"per_step_{k}": statistics.mean(xs) if xs else math.nan for k, xs in per_step.items()} | {
            "steps_left_out": len(test) - len(per_step["lam1"])}

    print("before:", {k: round(x, 3) for k, x in measure().items()}, flush=True)
    g = cfg.rollout.group_size
    for epoch in range(1, args.epochs + 1):
        t0, losses = time.perf_counter(), []
        for i in torch.randperm(len(train)).tolist():
            ro, score = train[i]
            m = ro.completion_mask
            for rows in torch.arange(len(score)).split(len(score) // cfg.ppo.minibatches // g * g):
                v = critic.values(ro, rows, "shared")
                loss = 0.5 * (((v - score[rows, None]) ** 2) * m[rows]).sum() / m[rows].sum()
                (cfg.ppo.vf_coef * loss).backward()  # as weighted in PPO's loss, so the clip bites alike
                torch.nn.utils.clip_grad_norm_(optim.params, optim.max_grad_norm)
                optim.optimizer.step()
                optim.scheduler.step()
                optim.optimizer.zero_grad()
                losses.append(loss.item())
        print(f"epoch {epoch}: train loss {statistics.mean(losses):.3f} ({time.perf_counter() - t0:.0f} s), "
              f"test: {({k: round(x, 3) for k, x in measure().items()})}", flush=True)


if __name__ == "__main__":
    main()
