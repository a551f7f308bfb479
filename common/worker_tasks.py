"""How the sharding and the decoding workers start, and their task loop."""

from __future__ import annotations

import gc
import os
import queue
from collections.abc import Iterable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any


def start_workers(processes: Iterable[BaseProcess]) -> None:
    """Start worker processes with every object of this process frozen for the collector.

    A forked worker inherits this process's objects, garbage not yet collected included (a
    DALI pipeline dropped by an earlier pass, say). Were the worker's collector to finalize
    one, its destructor would wait on threads that exist only here: the worker would hang,
    and its parent with it, waiting for results. Frozen objects are never collected in the
    worker (and their pages stay shared); here they are unfrozen as soon as it has started.
    """
    gc.freeze()
    try:
        for process in processes:
            process.start()
    finally:
        gc.unfreeze()


def tasks_until_done(tasks: Any, poll_s: float) -> Iterator[Any]:
    """Tasks from a multiprocessing queue until a None arrives.

    Also ends when the parent process died (SIGKILL, the OOM killer): nobody would read the
    results, and a worker blocked forever on an empty queue would outlive the job.
    """
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=poll_s)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        yield task
