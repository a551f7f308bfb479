#!/usr/bin/env bash
# Create .venv (once) and install the project with its test tools; cheap to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# A plain "torch" pulls a multi-GB CUDA build on machines without one installed; pin it.
torch_spec=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing into .venv (first run takes a few minutes)" >&2
    # -qq: errors only (a pip config naming absent local indexes warns once per package)
    .venv/bin/python -m pip install -qq --upgrade pip
    .venv/bin/python -m pip install -qq "$torch_spec"
    .venv/bin/python -m pip install -qq -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
