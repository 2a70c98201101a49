#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job: GRPO on the embedded SmolLM2-135M-Instruct and the default
# arithmetic task (configs/default.yaml), the reward curve as a PNG, and the held-out eval of the base
# model and the trained one, side by side. Extra arguments go to `grouprl train` (e.g. --set steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/default-$(date +%Y%m%d-%H%M%S)}
G=.venv/bin/grouprl
$G train --config configs/default.yaml --set "output_dir=$OUT" "$@"
$G plot "$OUT"
$G eval --model embedded --config configs/default.yaml -o "$OUT/eval-base.json"
$G eval --model "$OUT/final" -o "$OUT/eval-trained.json" --baseline "$OUT/eval-base.json"
