"""The task loop of a worker process, shared by the sharding and the decoding workers."""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from typing import Any


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
