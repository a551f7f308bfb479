"""Shared fixtures. The session-scoped data sets are made once per test run and shared by
every module, read-only: a test that changes one works on a copy in its tmp_path (each is
checked unchanged when the session ends)."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import SYNTHETIC_SHARDS, assert_ok, run_module, tree_bytes
from tests.shard_helpers import FACE_COUNTS, face_tree, shard_folder

# Ctrl-C reaches the CLIs under test as a terminal delivers it, also when the suite itself
# runs as a background job: a non-interactive shell starts `cmd &` with SIGINT ignored, every
# child inherits that, and Python then never raises KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The in-process tests on one torch thread too, as module_env gives every CLI under test: on
# two busy cores a second thread makes tiny steps several times slower, never faster.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture
def run_cli():
    return run_module


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_tests() -> Iterator[None]:
    """Kill, and name, whatever the tests left running: a forked worker stuck after a failed
    test would hold the output pipe of whoever runs the suite (CI waits for it to close)
    long after pytest itself has exited."""
    yield
    gc.collect()  # loaders the tests dropped stop their workers as they are collected
    left = psutil.Process().children(recursive=True)
    named = [f"{process.pid} {_command(process)}" for process in left]
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    if left:
        warnings.warn(f"killed {len(left)} processes the tests left running: "
                      + "; ".join(named), stacklevel=1)


def _command(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(process.cmdline())[:200]
    return "(gone)"


def _shared(path: Path) -> Iterator[Path]:
    """Yield a session data set, then check no test wrote into it."""
    before = tree_bytes(path)
    yield path
    assert tree_bytes(path) == before, f"a test changed the shared {path}; copy it first"


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shards of SYNTHETIC_SHARDS (10 people x 8 photos)."""
    out = tmp_path_factory.mktemp("synthetic") / "shards"
    assert_ok(run_module("data_engine.shard", *SYNTHETIC_SHARDS, "--out", out))
    yield from _shared(out)


@pytest.fixture(scope="session")
def face_shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``--src folder`` shards of rendered faces, FACE_COUNTS photos per identity."""
    base = tmp_path_factory.mktemp("faces")
    face_tree(base / "tree", FACE_COUNTS)
    yield from _shared(shard_folder(base / "tree", base / "shards"))


@pytest.fixture(scope="session")
def verification_sets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A --val folder with one tiny .bin of 10 other people (20 pairs)."""
    folder = tmp_path_factory.mktemp("val")
    assert_ok(run_module("evaluate", "synth-bin", "--out", folder / "synth.bin",
                         "--identities", "10", "--first-identity", "1000", "--pairs", "20"))
    yield from _shared(folder)


@pytest.fixture(scope="session")
def synth_ijb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny synthetic IJB-C folder (4 people, 1 probe each)."""
    root = tmp_path_factory.mktemp("ijb") / "ijbc"
    assert_ok(run_module("evaluate", "synth-ijb", "--out", root, "--identities", "4",
                         "--probes", "1", "--first-identity", "500", "--seed", "3"))
    yield from _shared(root)
