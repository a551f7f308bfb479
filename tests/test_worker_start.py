"""Forked workers leave the garbage they inherit to their parent.

A worker forked while its parent holds garbage not yet collected (a DALI pipeline dropped by
an earlier pass) used to finalize that garbage itself whenever its collector ran: the
pipeline's destructor waits on threads that exist only in the parent, so the worker hung,
and its parent with it, waiting for results. Here the garbage is a reference cycle whose
finalizer records the pid that ran it, and each child collects right after the fork (where
a worker's collector may run at any allocation): only this process may run the finalizer.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

from data_engine.loading.loader import build_loader
from data_engine.writing.shardwriter import init_worker
from data_engine.writing.workers import Workers
from tests.test_loader import K, _collect

_collect_in_children = False


def _collect_if_asked() -> None:
    if _collect_in_children:
        gc.collect()


os.register_at_fork(after_in_child=_collect_if_asked)


class _Garbage:
    """Unreachable as soon as it is made (it refers to itself); its finalizer logs a pid."""

    def __init__(self, log: Path) -> None:
        self.log, self.cycle = log, self

    def __del__(self) -> None:
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()}\n")


@contextlib.contextmanager
def _garbage_then_forks(log: Path) -> Iterator[None]:
    """Garbage that this process does not collect before the block ends, while every child
    forked in the block collects first thing; then it is collected here."""
    global _collect_in_children
    enabled = gc.isenabled()
    gc.disable()
    _collect_in_children = True
    try:
        _Garbage(log)
        yield
    finally:
        _collect_in_children = False
        if enabled:
            gc.enable()
    gc.collect()


def test_sharding_workers_leave_inherited_garbage_alone(tmp_path: Path) -> None:
    log = tmp_path / "finalized_by"
    with _garbage_then_forks(log), Workers(2, init_worker, (None, None, None)):
        pass  # the workers start, collect, and are told to stop
    assert log.read_text().split() == [str(os.getpid())]


def test_decode_workers_leave_inherited_garbage_alone(face_shards: Path, tmp_path: Path) -> None:
    log = tmp_path / "finalized_by"
    loader = build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu", workers=2)
    with _garbage_then_forks(log):
        loader.start()
    assert len(_collect(loader)["labels"]) > 0  # the workers decode a pass after all
    loader.close()
    assert log.read_text().split() == [str(os.getpid())]
