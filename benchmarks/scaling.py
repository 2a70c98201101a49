"""Steps per second and peak memory per rank at world size 1 and N, measured side by side.

    python benchmarks/scaling.py [--config configs/default.yaml] [--steps 6] [--rounds 2] [--worlds 1,2]

Runs `grouprl train --nproc W` for each world size in turn (W1, W2, W1, W2, ...: alternating, so drift in the
machine's speed hits both), each for --steps steps of the config with no checkpoints, and reads the runs'
metrics.jsonl: the median step time over all steps but the first of every run of that world size, the
sampling and update parts, and the peak memory (rank 0's, and the largest over ranks). Prints a markdown
table and writes it with the raw figures to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(config: str, world: int, steps: int, out: Path, sets: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "grouprl", "train", "--nproc", str(world), "--config", config,
           "--set", f"steps={steps}", "--set", "save_every=0", "--set", f"output_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("docs/results/scaling.json"))
    a = ap.parse_args()
    worlds = [int(w) for w in a.worlds.split(",")]
    rows: dict[int, list[dict]] = {w: [] for w in worlds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for w in worlds:
                metrics = run(a.config, w, a.steps, Path(tmp) / f"w{w}-r{r}", a.sets)
                rows[w] += metrics[1:]  # the first step warms up
                print(f"round {r} world {w}: step times {[round(m['step_time'], 1) for m in metrics]}", flush=True)
    base = statistics.median(m["step_time"] for m in rows[worlds[0]])
    table = ["| world size | median step (s) | steps/s | speed-up | sampling (s) | update (s) | peak memory, rank 0 "
             "(GiB) | peak memory, largest rank (GiB) |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for w, ms in rows.items():
        step = statistics.median(m["step_time"] for m in ms)
        gen = statistics.median(m["gen_time"] + m["score_time"] for m in ms)
        upd = statistics.median(m["update_time"] for m in ms)
        mem0 = max(m["peak_mem_gib"] for m in ms)
        mem = max(m.get("peak_mem_gib_max", m["peak_mem_gib"]) for m in ms)
        summary[w] = {"median_step_s": step, "steps_per_s": 1 / step, "speedup": base / step, "sampling_s": gen,
                      "update_s": upd, "peak_mem_gib_rank0": mem0, "peak_mem_gib_max": mem, "steps_measured": len(ms)}
        table.append(f"| {w} | {step:.1f} | {1 / step:.3f} | {base / step:.2f}x | {gen:.1f} | {upd:.1f} | {mem0:.2f} "
                     f"| {mem:.2f} |")
    print("\n".join(table))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"config": a.config, "steps": a.steps, "rounds": a.rounds, "sets": a.sets,
                                 "summary": summary, "table": table, "raw": rows}, indent=1))


if __name__ == "__main__":
    main()
