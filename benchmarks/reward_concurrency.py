"""How long a batch of 4 completions takes to score with slow rewards: three async functions (1 s each, one of
them 1 s per completion: 6 s one after another) awaited concurrently, and a synchronous one (0.5 s per
completion) in the training process and in 2 worker processes (reward_workers). Medians of 3 after a warm-up.

    python benchmarks/reward_concurrency.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grouprl.rewards import RewardSet  # noqa: E402

FUNCTIONS = '''
import asyncio, time

async def slow_a(prompts, completions, **kw):
    await asyncio.sleep(1.0)
    return [1.0] * len(completions)

async def slow_b(prompts, completions, **kw):
    await asyncio.sleep(1.0)
    return [0.0] * len(completions)

async def per_completion(prompts, completions, **kw):
    async def one(c):
        await asyncio.sleep(1.0)
        return 1.0
    return await asyncio.gather(*(one(c) for c in completions))

def slow(prompts, completions, **kw):
    time.sleep(0.5 * len(completions))
    return [1.0] * len(completions)
'''


def median_seconds(rewards: RewardSet, repeats: int = 3) -> float:
    rewards.score(["p"], ["a"], {})  # warm-up (worker start-up)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rewards.score(["p"] * 4, ["a", "b", "c", "d"], {})
        times.append(time.perf_counter() - t0)
    rewards.close()
    return statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "slow_rewards.py"
        f.write_text(FUNCTIONS)
        names = [f"{f}:{n}" for n in ("slow_a", "slow_b", "per_completion")]
        print(f"3 async functions (6 s one after another): {median_seconds(RewardSet([(n, 1.0) for n in names])):.2f} s")
        for workers in (0, 2):
            s = median_seconds(RewardSet([(f"{f}:slow", 1.0)], workers=workers))
            print(f"a sync function, 4 x 0.5 s, reward_workers={workers}: {s:.2f} s")


if __name__ == "__main__":
    main()
