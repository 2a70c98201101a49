#!/usr/bin/env bash
# Step time of the main job at two git revisions, side by side: A B A B ... runs of
# `grouprl train --config configs/default.yaml --set steps=STEPS`, each revision from its own worktree, both
# with this checkout's .venv. Prints each run's step times and rewards, then the median step time of each
# revision and their ratio. Run it on an otherwise idle machine.
#   bash benchmarks/ab_revisions.sh 9c91553 HEAD [ROUNDS=2] [STEPS=4]
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 ROUNDS=${3:-2} STEPS=${4:-4}
PY=$PWD/.venv/bin/python
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/A" 2>/dev/null; git worktree remove --force "$WORK/B" 2>/dev/null; rm -rf "$WORK"' EXIT
git worktree add -q --detach "$WORK/A" "$A"
git worktree add -q --detach "$WORK/B" "$B"
for i in $(seq "$ROUNDS"); do
  for side in A B; do
    (cd "$WORK/$side" && PYTHONPATH=$WORK/$side "$PY" -m grouprl train --config configs/default.yaml \
      --set steps="$STEPS" --set save_every=0 --set output_dir="$WORK/out-$side-$i" > "$WORK/$side-$i.log" 2>&1)
  done
done
"$PY" - "$WORK" "$ROUNDS" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
times = {}
for side in "AB":
    for i in range(1, rounds + 1):
        rows = [json.loads(line) for line in open(f"{work}/out-{side}-{i}/metrics.jsonl")]
        print(side, i, "step s", [round(r["step_time"], 2) for r in rows], "reward", [round(r["reward"], 3) for r in rows])
        times.setdefault(side, []).extend(r["step_time"] for r in rows)
a, b = statistics.median(times["A"]), statistics.median(times["B"])
print(f"median step time: A {a:.2f} s, B {b:.2f} s, B/A {b / a:.2f}")
PY
