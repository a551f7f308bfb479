#!/usr/bin/env bash
# Set up, lint and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# pytest exits 5 when no test ran, so an empty run fails here too.
# Two pytest processes (TEST_WORKERS=0: one): a test mostly keeps one core busy (its CLIs run
# torch on one thread), so two halve the suite's wall time on a 2-core machine.
.venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --durations=15 "$@"
