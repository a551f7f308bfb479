"""Durable file writes shared by sharding, checkpoints and every other writer.

A file is only ever visible under its final name once complete: it is written to a temp
name beside it (``.NAME.tmp``), fsynced, renamed, and the directory fsynced.

A write that fails because of the machine (full disk, quota, file size limit, read-only or
forbidden directory) raises :class:`WriteError`: one line naming the path, the cause and,
for a full disk, the bytes needed and free, so the CLI can print it instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from common.errors import UserError

TEMP_SUFFIX = ".tmp"

# errno -> what to call it in a message; the space ones also get "needed / free" numbers.
SPACE_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file size limit reached"}
ENVIRONMENT_ERRORS = {**SPACE_ERRORS, errno.EROFS: "read-only file system",
                      errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


class WriteError(UserError):
    """A write the environment refused (full disk, read-only dir): what, where, how much."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)

    def __reduce__(self):  # crosses process pools intact (the shard writers are workers)
        return type(self), (str(self), str(self.path))


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB': sizes in messages a person reads."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer can still use on the filesystem holding ``path``."""
    for folder in (Path(path), *Path(path).parents):
        try:
            stats = os.statvfs(folder)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return None


def environment_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` when the machine refused a write, else None.

    Looks through the exception chain: torch.save reports a full disk as a RuntimeError
    ("unexpected pos ...") raised while handling the ENOSPC from the file.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in ENVIRONMENT_ERRORS:
            return current
        current = current.__cause__ or current.__context__
    return None


def describe(error: OSError) -> str:
    """'disk full (No space left on device)': the cause in words a user acts on."""
    detail = error.strerror or str(error)
    what = ENVIRONMENT_ERRORS.get(error.errno if error.errno is not None else -1)
    if what is None or what.lower() == detail.lower():
        return detail
    return f"{what} ({detail})"


def write_error(path: str | os.PathLike, error: OSError, needed: int | None = None,
                hint: str = "", needed_for: str = "") -> WriteError:
    """The one-line :class:`WriteError` for ``error`` met while writing ``path``."""
    code = error.errno if error.errno is not None else -1
    message = f"cannot write {path}: {describe(error)}"
    if code in SPACE_ERRORS:
        free = free_bytes(Path(path).parent)
        amounts = [(f"needs {human_bytes(needed)}{needed_for and ' ' + needed_for}"
                    if needed is not None else ""),
                   f"{human_bytes(free)} free in {Path(path).parent}" if free is not None
                   else ""]
        if any(amounts):
            message += ": " + ", ".join(text for text in amounts if text)
    return WriteError(message + (f"; {hint}" if hint else ""), path)


class _CountingSink:
    """A file-like object that only counts: sizes a write that did not fit."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _size_of(data: bytes | Callable[[BinaryIO], None]) -> int | None:
    if not callable(data):
        return len(data)
    sink = _CountingSink()
    try:
        data(sink)  # type: ignore[arg-type]
    except Exception:  # a writer that needs a real file: the size stays unknown
        return None
    return sink.count


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable (POSIX keeps the entry in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function writing to the open file), all or
    nothing: a crash leaves the old file (or none) and at most a temp file, never half.

    A full disk or a read-only directory raises :class:`WriteError` (the temp file removed,
    the old file untouched); a function's output is sized afterwards for the message.
    """
    path = Path(path)
    temp = temp_path(path)
    try:
        with open(temp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        fsync_dir(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):  # a read-only directory refuses even this
            temp.unlink(missing_ok=True)
        cause = environment_error(error)
        if cause is None:
            raise
        needed = _size_of(data) if cause.errno in SPACE_ERRORS else None
        raise write_error(path, cause, needed) from error
