#!/usr/bin/env bash
# Set up .venv with the test tools and the reference oracle, lint, then run every test
# (the slow ones too). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
VENV="${MEMENC_VENV:-.venv}"
"$VENV/bin/ruff" check memenc tests benchmarks scripts
"$VENV/bin/ruff" format --check memenc tests benchmarks scripts
"$VENV/bin/python" -m pytest "$@"
