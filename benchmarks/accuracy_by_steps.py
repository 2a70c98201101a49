"""Held-out accuracy of a `grouprl compare` report folder split by the problems' number of steps (the
arithmetic task's `steps` column): does an arm learn the two-step problems, or only the one-step ones?

    python benchmarks/accuracy_by_steps.py runs/compare/two-step [--arms grpo,ppo,dr-grpo] [--seeds 0,1,2]
        [--step 40]

Reads the cached evaluations (eval-base.json, runs/<arm>/seed-<seed>/eval-step-<step>.json) and the held-out
rows of the first run's config; nothing is evaluated again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from grouprl.config import load_config
from grouprl.tasks import build_task


def rates(correct: list[int], kinds: dict[int, list[int]]) -> dict[int, float]:
    """Per number of steps, the percentage of its problems answered right."""
    return {k: 100 * sum(correct[i] for i in ix) / len(ix) for k, ix in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--arms", default="grpo,ppo,dr-grpo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--step", type=int, default=40)
    args = ap.parse_args()
    arms, seeds = args.arms.split(","), args.seeds.split(",")
    cfg = load_config(args.out / "runs" / arms[0] / f"seed-{seeds[0]}" / "config.yaml")
    base = json.loads((args.out / "eval-base.json").read_text())["correct"]
    rows = build_task(cfg.task).eval[:len(base)]
    kinds = {k: [i for i, r in enumerate(rows) if r.get("steps") == k] for k in sorted({r.get("steps") for r in rows})}
    print(f"held-out problems: {len(rows)}; " + ", ".join(f"{k}-step {len(ix)}" for k, ix in kinds.items()))
    print("base model: " + ", ".join(f"{k}-step {v:.1f}%" for k, v in rates(base, kinds).items()))
    for arm in arms:
        per_seed = [rates(json.loads((args.out / "runs" / arm / f"seed-{s}" / f"eval-step-{args.step}.json")
                                     .read_text())["correct"], kinds) for s in seeds]
        cells = [f"{k}-step {statistics.mean(r[k] for r in per_seed):.1f}% "
                 f"(seeds {' / '.join(f'{r[k]:.1f}' for r in per_seed)})" for k in kinds]
        print(f"{arm} at step {args.step}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
