#!/usr/bin/env bash
# Set up, lint and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# pytest exits 5 when no test ran, so an empty run fails here too.
.venv/bin/python -m pytest "$@"
