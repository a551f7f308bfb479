"""What a run reports: RUN/metrics.jsonl, TensorBoard scalars and the progress postfix.

metrics.jsonl is the record tools read (one JSON object per logged step); TensorBoard is
for looking at curves; the progress line is for the person watching the terminal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.files import environment_error, write_atomic, write_error
from common.run_folder import METRICS, RECORD_KEYS, TENSORBOARD_DIR, read_metrics


def peak_memory_bytes(device: str) -> int:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process on CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and mirrors numbers to TensorBoard.

    Each record is one ``write`` of one whole line to a file opened ``O_APPEND``, so a
    reader of a live run (``tail -f``, the report) sees whole lines only; a write the disk
    cannot take is cut back to the last whole line and raised as a one-line WriteError.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool, resume_step: int = 0) -> None:
        self.path = run_dir / METRICS
        # On resume, records after the checkpoint belong to steps that are about to be redone.
        self._drop_after(resume_step)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise _as_write_error(self.path, error) from None
        self._writer = None
        self._tensorboard_dir = run_dir / TENSORBOARD_DIR
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            threading.excepthook = _quiet_tensorboard_thread(threading.excepthook)
            try:
                self._writer = SummaryWriter(str(self._tensorboard_dir),
                                             purge_step=resume_step or None)
            except Exception as error:
                raise _as_write_error(self._tensorboard_dir, error) from None

    def _drop_after(self, step: int) -> None:
        if not self.path.exists():
            return
        # live: a line torn by a crash is dropped with the records after the checkpoint
        kept = [record for record in read_metrics(self.path.parent, live=True)
                if record.get("step", step + 1) <= step]
        write_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept).encode())

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        """One JSON line (one write, flushed: ``tail -f`` and crashes see it) and TB scalars."""
        self._append((json.dumps(record) + "\n").encode())
        if self._writer is not None:
            try:
                for key, value in record.items():
                    if key not in RECORD_KEYS and isinstance(value, int | float):
                        self._writer.add_scalar(f"{prefix}/{key}", value, record["step"])
                self._writer.flush()
            except Exception as error:
                writer, self._writer = self._writer, None  # broken: do not flush it again
                with contextlib.suppress(Exception):
                    writer.close()
                raise _as_write_error(self._tensorboard_dir, error) from None

    def _append(self, line: bytes) -> None:
        end = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # the disk took part of it: the next write would fail
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)  # no torn last line
            raise _as_write_error(self.path, error, len(line)) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except Exception as error:
                raise _as_write_error(self._tensorboard_dir, error) from None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _as_write_error(path: Path, error: BaseException, needed: int | None = None) -> Exception:
    """A full disk or read-only run folder as one line naming the file; else unchanged."""
    cause = environment_error(error)
    return error if cause is None else write_error(path, cause, needed)


def _quiet_tensorboard_thread(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """TensorBoard's writer thread prints a traceback when it dies (a full disk); the main
    thread re-raises that error on the next write, reported in one line, so stay quiet."""
    if getattr(previous, "quiet_tensorboard", False):
        return previous

    def hook(args: Any) -> object:
        if type(args.thread).__name__ == "_AsyncWriterThread" and environment_error(
                args.exc_value) is not None:
            return None
        return previous(args)

    hook.quiet_tensorboard = True  # type: ignore[attr-defined]
    return hook


def postfix(record: dict[str, Any], epochs: int) -> str:
    """The fields a person watching wants, in one short line."""
    loss = "skipped" if record["loss"] is None else f"{record['loss']:.4f}"
    return (f"epoch {record['epoch'] + 1}/{epochs} loss {loss} "
            f"lr {record['lr']:.4g} {record['samples_per_s']:.0f} samples/s "
            f"{record['images_per_s']:.0f} img/s mem {record['mem_bytes'] / 2**30:.2f}G")
