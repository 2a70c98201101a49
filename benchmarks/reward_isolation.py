"""What running the reward functions in a worker process (reward_workers: 1) costs per step against running
them in the training process (0, the default): the built-in rewards of the GSM8K recipe (correctness through
math-verify, strict and soft format) on one step's completions, and a user reward file's trivial function.
Medians of 20 steps after a warm-up; the worker's start-up once per run.

    python benchmarks/reward_isolation.py [--completions 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grouprl.rewards import RewardSet  # noqa: E402


def batch(n: int) -> tuple[list[str], list[str], dict]:
    """n completions in the recipe's format, half right; a 200-character reasoning each."""
    completions = [f"<reasoning>\n{'step ' * 40}\n</reasoning>\n<answer>\n{i % 7}\n</answer>" for i in range(n)]
    return ["What is 3 + 4?"] * n, completions, {"answer": [str((i % 2) * (i % 7)) for i in range(n)]}


def per_step(rewards: RewardSet, n: int, steps: int) -> tuple[float, float]:
    """(start-up and first call, median seconds per step)."""
    prompts, completions, columns = batch(n)
    t0 = time.perf_counter()
    rewards.score(prompts, completions, columns)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        rewards.score(prompts, completions, columns)
        times.append(time.perf_counter() - t0)
    rewards.close()
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--completions", type=int, default=64, help="completions per step (prompts x G)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        user = Path(tmp) / "mine.py"
        user.write_text("def length(prompts, completions, **kw):\n    return [len(c) / 100 for c in completions]\n")
        sets = {"built-in (correctness, strict_format, soft_format)": ["correctness", "strict_format", "soft_format"],
                "a user file's function": [f"{user}:length"]}
        print(f"{args.completions} completions per step, median of {args.steps} steps")
        for label, names in sets.items():
            for workers in (0, 1):
                first, step = per_step(RewardSet([(n, 1.0) for n in names], workers=workers), args.completions,
                                       args.steps)
                print(f"{label}, reward_workers={workers}: {1000 * step:.1f} ms per step "
                      f"(first call, start-up included: {first:.2f} s)")


if __name__ == "__main__":
    main()
