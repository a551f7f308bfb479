"""Sharding's worker processes: a dead worker ends the job with one line, never a hang.

``multiprocessing.Pool`` replaces a killed worker and waits forever for the task it held
(the kernel's out-of-memory killer kills exactly one worker), and its ``terminate`` can
block on a queue lock the dead worker held. Here the parent waits on the result pipe and on
every worker's exit at once; a worker that exits before it is told to ends the job with a
:class:`WorkerDiedError` naming its pid, how it died and the task it held. The other
workers are stopped and the results sent before are handed out first, so the caller can
keep what was finished.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from common.errors import UserError
from common.worker_tasks import start_workers, tasks_until_done

_POLL_S = 0.5  # how often a waiting parent calls its tick and a waiting worker checks its parent
_IDLE = -1


class WorkerDiedError(UserError):
    """A worker process exited in the middle of the job (killed, or crashed in C code)."""


class WorkerTracebackError(Exception):
    """The traceback of an exception raised in a worker, chained to it in the parent."""


def _context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds; data_engine holds no threads or GPU state.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


class Workers:
    """``count`` processes that each run ``initializer(*initargs)`` once, then tasks.

    Use as a context manager: leaving the block stops the workers (at once, if it is left
    by an exception).
    """

    def __init__(self, count: int, initializer: Callable[..., None],
                 initargs: tuple = ()) -> None:
        context = _context()
        self._tasks = context.Queue()
        self._tasks.cancel_join_thread()  # never block exiting on tasks nobody will read
        self._results, writer = context.Pipe(duplex=False)
        lock = context.Lock()
        self._doing = context.Array("q", [_IDLE] * count, lock=False)  # task index per worker
        self._backlog: deque[tuple[int, bool, Any, str]] = deque()  # results read after a death
        self._death: str | None = None  # what a dead worker's error says
        self._procs = [context.Process(target=_serve, daemon=True,
                                       args=(slot, self._tasks, writer, lock, self._doing,
                                             initializer, initargs))
                       for slot in range(count)]
        start_workers(self._procs)
        writer.close()  # the workers hold it; the parent only reads

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._stop(at_once=exc_type is not None)
        self._results.close()

    def _stop(self, *, at_once: bool) -> None:
        """End every worker: after its tasks (a None each), or at once (SIGTERM)."""
        for proc in self._procs:
            if not at_once:
                self._tasks.put(None)
            elif proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def map(self, function: Callable[[Any], Any], items: Iterable[Any],
            doing: Callable[[Any], str], *, ordered: bool = True,
            tick: Callable[[], None] | None = None) -> Iterator[Any]:
        """``function(item)`` for each item, in item order or as they finish.

        ``doing(item)`` says what a worker holding ``item`` was doing, for
        :class:`WorkerDiedError`; ``tick`` is called while waiting (progress bars). An exception
        in a worker is raised here, with the worker's traceback chained to it.
        """
        items = list(items)
        for index, item in enumerate(items):
            self._tasks.put((index, function, item))
        finished: dict[int, Any] = {}
        next_index = 0
        for _ in items:
            index, ok, value, text = self._receive(items, doing, tick)
            if not ok:
                raise value from WorkerTracebackError(text)
            if not ordered:
                yield value
                continue
            finished[index] = value
            while next_index in finished:
                yield finished.pop(next_index)
                next_index += 1

    def _receive(self, items: list[Any], doing: Callable[[Any], str],
                 tick: Callable[[], None] | None) -> tuple[int, bool, Any, str]:
        """The next result; after a death, the results sent before it, then the error."""
        sentinels = {proc.sentinel: slot for slot, proc in enumerate(self._procs)}
        while not self._backlog:
            if self._death is not None:
                raise WorkerDiedError(self._death)
            ready = wait([self._results, *sentinels], timeout=_POLL_S)
            dead = [sentinels[s] for s in ready if s in sentinels]
            if dead:
                task = self._doing[dead[0]]
                self._death = _death(self._procs[dead[0]],
                                     doing(items[task]) if task != _IDLE else "idle")
                self._drain()
            elif ready:
                return self._results.recv()
            elif tick is not None:
                tick()
        return self._backlog.popleft()

    def _drain(self) -> None:
        """Stop every worker, then keep the results they sent. With all writers gone, a
        result cut short by the death reads as the end of the pipe instead of a hang."""
        self._stop(at_once=True)
        while self._results.poll():
            try:
                self._backlog.append(self._results.recv())
            except (EOFError, OSError):
                break


def _death(proc: mp.process.BaseProcess, doing: str) -> str:
    proc.join(timeout=5)  # its pipe closes before its exit status can be collected
    code = proc.exitcode
    if code is None:
        how = "died"
    elif code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += " (the out-of-memory killer sends it: free memory or use fewer --workers)"
    else:
        how = f"exited with code {code}"
    return (f"sharding worker {proc.pid} {how} while {doing}; rerun the same command to "
            "resume (finished shards are kept)")


def _serve(slot: int, tasks: mp.Queue, results: Connection, lock: Any, doing: Any,
           initializer: Callable[..., None], initargs: tuple) -> None:
    """Run tasks until a None arrives; exit if the parent died (nobody would read)."""
    initializer(*initargs)
    for index, function, item in tasks_until_done(tasks, _POLL_S):
        doing[slot] = index
        try:
            outcome = (index, True, function(item), "")
        except Exception as error:  # raised in the parent, with this traceback chained
            outcome = (index, False, error, traceback.format_exc())
        with lock:
            try:
                results.send(outcome)
            except Exception:  # the result or the exception does not pickle
                results.send((index, False, RuntimeError(f"task {index} failed"),
                              traceback.format_exc()))
        doing[slot] = _IDLE
