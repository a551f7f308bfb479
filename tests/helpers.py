"""What the tests share besides fixtures: the CLIs run as a user runs them, the one-line error
convention, metrics.jsonl read as a live reader would, and the tiny settings of every
end-to-end training run (a slim mbf on the CPU that trains a step in well under a second)."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY_NETWORK_ARGS = {"blocks": [1, 1, 1, 1], "scale": 1}
# The test shards: 10 synthetic people x 8 photos (10 steps an epoch at --batch-size 8).
SYNTHETIC_SHARDS = ["--src", "synthetic", "--identities", "10", "--images-per-identity", "8",
                    "--seed", "0"]


def tiny_train_args(*, embedding_size: int = 64, workers: int = 1, **options: object,
                    ) -> list[str]:
    """``python -m train`` arguments for a tiny CPU run; ``options`` add flags by name
    (``batch_size=8`` is ``--batch-size 8``)."""
    args = ["--network", "mbf", "--network-args", json.dumps(TINY_NETWORK_ARGS),
            "--embedding-size", str(embedding_size), "--device", "cpu", "--backend", "torch",
            "--workers", str(workers), "--no-tensorboard", "--val", "none"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def module_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI under test: this checkout first on the path, and one thread
    unless the caller's environment says otherwise (the tests share two busy cores, where
    torch's default thread pool spends more time spinning than computing)."""
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(REPO), **(env or {})}


def run_module(module: str, *args: object, timeout: float = 600,
               env: dict[str, str] | None = None, prefix: Sequence[str] = (),
               **kwargs) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh interpreter, as a user would run it (``prefix``:
    under another command, such as strace)."""
    return subprocess.run([*prefix, sys.executable, "-m", module, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=module_env(env),
                          cwd=kwargs.pop("cwd", REPO), **kwargs)


def start_module(module: str, *args: object, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = (), **kwargs) -> subprocess.Popen:
    """``python -m module args`` started in the background (stderr piped, as text), for
    tests that signal or watch a running CLI; ``prefix`` runs it under another command."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen([*prefix, sys.executable, "-m", module, *map(str, args)],
                            cwd=REPO, env=module_env(env), stderr=subprocess.PIPE, text=True,
                            **kwargs)


def assert_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 with one error line (log lines such as "12:00:00 INFO ..." may precede it)
    that contains every needle, and no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def read_metrics(run: Path, kind: str | None = "train") -> list[dict]:
    """The records of ``run/metrics.jsonl`` of one kind (None: all), asserting the file
    holds whole lines only; [] before the first record."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    assert not text or text.endswith("\n"), f"torn last line: {text[-80:]!r}"
    records = [json.loads(line) for line in text.splitlines()]
    return [r for r in records if kind is None or r.get("kind", "train") == kind]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): what "nothing changed" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def wait_until(condition: Callable[[], bool], *processes: subprocess.Popen,
               timeout: float = 240) -> None:
    """Poll ``condition`` until it holds; fail if one of ``processes`` exits first, or after
    ``timeout`` seconds (a hang guard, never a verdict on speed)."""
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            assert process.poll() is None, f"exited {process.returncode} first: " + (
                process.stderr.read()[-3000:] if process.stderr else "")
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.02)


def trend_growth(samples: dict[int, float]) -> float:
    """Growth from the first to the last sample along the median slope over all pairs of
    samples (Theil-Sen): one or two outlying samples, high or low, barely move it, and a
    steady leak shows in full."""
    xs = sorted(samples)
    slopes = [(samples[b] - samples[a]) / (b - a) for a, b in itertools.combinations(xs, 2)]
    return statistics.median(slopes) * (xs[-1] - xs[0])
