"""Every entry point: --help works, bad flags and missing paths give one line and exit 2."""

from __future__ import annotations

import pytest

ENTRY_POINTS = {
    "data_engine.shard": ["--src", "folder", "--root", "{missing}", "--out", "{tmp}/o"],
    "train": ["--shards", "{missing}", "--output", "{tmp}/run"],
    "evaluate": ["ijbc", "--root", "{missing}", "--features", "{tmp}/f.npy"],
    "model.export": ["{missing}", "--onnx", "{tmp}/m.onnx"],
}


def _fill(args, tmp_path):
    missing = tmp_path / "does-not-exist"
    return [a.format(missing=missing, tmp=tmp_path) for a in args]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_zero(run_cli, module):
    result = run_cli(module, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--debug" in result.stdout


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_unknown_flag_is_one_line_exit_2(run_cli, module):
    result = run_cli(module, "--no-such-flag")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--no-such-flag" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_missing_path_is_one_line_naming_it(run_cli, module, tmp_path):
    result = run_cli(module, *_fill(ENTRY_POINTS[module], tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "does-not-exist" in lines[0] and "Traceback" not in result.stderr


def test_user_error_with_debug_shows_traceback(tmp_path):
    """--debug turns the one-line error into the full traceback for bug reports."""
    import subprocess
    import sys

    from tests.helpers import REPO

    code = ("from common.cli import run_cli, UserError\n"
            "def main(argv):\n    raise UserError('bad thing in x.txt')\n"
            "run_cli('prog', main)\n")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO)
    assert plain.returncode == 2
    assert plain.stderr.strip() == "prog: error: bad thing in x.txt"
    debug = subprocess.run([sys.executable, "-c", code, "--debug"], capture_output=True,
                           text=True, cwd=REPO)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_progress_logs_rate_and_eta_without_tty(caplog):
    import logging

    from common.progress import Progress

    with caplog.at_level(logging.INFO, logger="progress"):
        progress = Progress(total=10, desc="work", unit="img", log_every_s=0.0, tty=False)
        progress.update(5)
        progress.close()
    line = caplog.records[-1].getMessage()
    assert line.startswith("work: 10/10 img") or line.startswith("work: 5/10 img")
    assert "img/s" in line and "ETA" in line
