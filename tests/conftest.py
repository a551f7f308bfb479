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


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 with one error line (log lines such as "12:00:00 INFO ..." may precede it)
    that contains every needle, and no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
