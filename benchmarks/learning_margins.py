"""How far each threshold of tests/test_learning.py is from failing: its runs (the tiny model learning to say
'a') over several training seeds. Another CPU rounds differently and can send a run down another path, like
another seed: a threshold that holds with room over seeds holds on any machine.

    python benchmarks/learning_margins.py [--seeds 0,1,2,3,4] [--cases grpo,variants,cb_packed,ppo,entropy]

Prints a JSON line per run, then per case the worst over seeds: the largest starting reward (mean of the first
3 steps), the smallest rise (last 3 steps' mean less the first 3's) and, for PPO, the smallest peak and
last-5-steps' explained variance of the critic. About 3 minutes for the five cases x 5 seeds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import conftest  # noqa: E402  (the suite's environment: one thread, ...)
from rich.console import Console  # noqa: E402

from grouprl.config import load_config  # noqa: E402
from grouprl.loop import train  # noqa: E402
from test_learning import CASES, toy_config  # noqa: E402


def run(case: str, seed: int, files: tuple[Path, Path, Path], out: Path, steps: int | None) -> dict:
    extra = CASES[case] | {"seed": seed} | ({"steps": steps} if steps else {})
    h = train(load_config(None, toy_config(*files, out, **extra)), console=Console(quiet=True)).history
    first, last = sum(r["reward"] for r in h[:3]) / 3, sum(r["reward"] for r in h[-3:]) / 3
    row = {"case": case, "seed": seed, "steps": len(h), "first": round(first, 3), "rise": round(last - first, 3)}
    if "explained_var" in h[0]:
        row["explained_var_peak"] = round(max(r["explained_var"] for r in h), 3)
        row["explained_var_last5"] = round(max(r["explained_var"] for r in h[-5:]), 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=None, help="instead of each test's own (a quick check)")
    args = ap.parse_args()
    cases, seeds = args.cases.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}: expected some of {list(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = (conftest.make_tiny_model(tmp / "model"), conftest.write_toy_data(tmp / "toy.jsonl"),
                 conftest.write_toy_reward(tmp / "toy_reward.py"))
        rows = []
        for case in cases:
            for seed in seeds:
                rows.append(run(case, seed, files, tmp / f"{case}-{seed}", args.steps))
                print(json.dumps(rows[-1]), flush=True)
    for case in cases:
        mine = [r for r in rows if r["case"] == case]
        worst = {"first": max(r["first"] for r in mine), "rise": min(r["rise"] for r in mine)}
        worst |= {k: min(r[k] for r in mine) for k in ("explained_var_peak", "explained_var_last5") if k in mine[0]}
        print(f"{case:10s} worst over seeds {seeds}: " + "  ".join(f"{k} {v}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
