"""Shared fixtures: run CLIs as real subprocesses with the project on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh interpreter, as a user would run it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=kwargs.pop("cwd", REPO),
                          **kwargs)


@pytest.fixture
def run_cli():
    return run_module
