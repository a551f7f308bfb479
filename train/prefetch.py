"""Prepare the next batches in a background thread so data loading overlaps compute.

The loader's own work (decode, copy to the device) releases the GIL, so a thread is enough
to keep ``depth`` batches ready while the main thread launches the training step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``source`` in a thread, at most ``depth`` items ahead of the consumer.

    Errors in the thread are re-raised in the consumer; leaving the ``with`` block early
    (a stop request, --max-steps) stops the thread without draining the source.
    """

    def __init__(self, source: Iterable[T], depth: int = 2) -> None:
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(error)
            return
        self._put(_DONE)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __enter__(self) -> Prefetcher[T]:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
