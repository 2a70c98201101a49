#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# TRL, so that benchmarks/vs_trl.py's smoke test runs both systems (it runs grouprl alone without it)
.venv/bin/python -m pip install -q -e ".[bench]" || echo "warning: TRL not installed; the A/B smoke test runs grouprl alone"
# The report page of `grouprl compare` is tested in a real headless browser: Debian's chromium, driven by
# playwright (pip, in the [test] extra). Installed here when missing and we may (root); else that test skips.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will skip"
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
