"""Progress for long work: a live bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from types import TracebackType

from tqdm import tqdm

log = logging.getLogger("progress")


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds))) if seconds == seconds and seconds >= 0 else "?"


class Progress:
    """Counts work done; shows rate and ETA.

    On a TTY this is a tqdm bar. Elsewhere (CI logs, ``nohup``) it writes one log line every
    ``log_every_s`` seconds, so logs stay readable and still show rate and ETA.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it",
                 log_every_s: float = 10.0, tty: bool | None = None) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.count = 0
        self.postfix = ""
        self._log_every_s = log_every_s
        self._start = time.monotonic()
        self._last_log = self._start
        use_bar = sys.stderr.isatty() if tty is None else tty
        self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                         file=sys.stderr) if use_bar else None

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            log.info(self.line())

    def set_postfix(self, text: str) -> None:
        """Extra fields shown after the rate (loss, lr, memory...)."""
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._start
        return self.count / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        done = f"{self.count}/{self.total}" if self.total else str(self.count)
        eta = _eta((self.total - self.count) / rate) if self.total and rate > 0 else "?"
        extra = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit} ({rate:.1f} {self.unit}/s, ETA {eta}){extra}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            log.info(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
