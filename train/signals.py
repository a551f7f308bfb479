"""Graceful stop on SIGINT/SIGTERM: the loop finishes its step, checkpoints and exits 0.

A run left going for days gets stopped by Ctrl-C, ``kill`` or a cluster's pre-emption
(SIGTERM); losing the hours since the last periodic checkpoint would be the worst outcome.
A second Ctrl-C stops at once (KeyboardInterrupt) for a user who really means it.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType, TracebackType

log = logging.getLogger(__name__)


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM into a flag the loop polls."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then checkpointing "
                    "(Ctrl-C again to stop at once)", self.signal_name)

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
