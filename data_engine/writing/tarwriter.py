"""Deterministic POSIX (ustar) tar writing with known data offsets and a running sha256.

Every header field that could vary between machines or runs (mtime, uid/gid, user names,
mode) is fixed, so the same members in the same order give byte-identical tars. Writing the
headers ourselves (instead of tarfile) keeps the per-file cost to a few microseconds and
tells us where each member's data starts, which the index needs for random access.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BLOCK = 512
RECORD = 20 * BLOCK  # what tar(1) and tarfile pad archives to
MTIME = 0
_FLUSH_BYTES = 4 << 20


def _template() -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = b"0000644\x00"  # mode
    header[108:116] = b"0000000\x00"  # uid
    header[116:124] = b"0000000\x00"  # gid
    header[136:148] = b"%011o\x00" % MTIME
    header[148:156] = b" " * 8  # checksum is computed with this field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return header


_TEMPLATE = _template()
_TEMPLATE_SUM = sum(_TEMPLATE)
# The fixed stretches of the header around the name, size and checksum fields: joining
# them is twice as fast as patching a copy of the template (it runs once per image).
_NAME_PADDING = bytes(100)
_MODE_UID_GID = bytes(_TEMPLATE[100:124])
_SIZE_END_AND_MTIME = bytes(_TEMPLATE[135:148])
_TYPE_TO_END = bytes(_TEMPLATE[156:BLOCK])
_ZEROS = memoryview(bytes(BLOCK))


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` with `size` bytes."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    size_field = b"%011o" % size
    if len(size_field) > 11:
        raise ValueError(f"tar member too large: {name} ({size} bytes)")
    checksum = _TEMPLATE_SUM + sum(encoded) + sum(size_field)  # both fields were zeros
    return b"".join((encoded, _NAME_PADDING[len(encoded):], _MODE_UID_GID, size_field,
                     _SIZE_END_AND_MTIME, b"%06o\x00 " % checksum, _TYPE_TO_END))


class TarWriter:
    """Append members to a new tar file; `close()` pads and returns (bytes, sha256).

    No fsync here: the caller makes the file durable before renaming it (the sharder does
    that in a background thread, so disk writeback overlaps the next shard's work).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pending: list[bytes | bytearray | memoryview] = []  # joined once per flush:
        self._pending_bytes = 0  # cheaper than growing a bytearray member by member
        self._sha = hashlib.sha256()
        self.position = 0

    def add(self, name: str, data: bytes) -> int:
        """Append one file; returns the byte offset of its data in the archive."""
        size = len(data)
        padding = -size % BLOCK
        self._pending += (member_header(name, size), data, _ZEROS[:padding])
        offset = self.position + BLOCK
        self.position = offset + size + padding
        self._pending_bytes += BLOCK + size + padding
        if self._pending_bytes >= _FLUSH_BYTES:
            self._flush()
        return offset

    def _flush(self) -> None:
        chunk = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._sha.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> tuple[int, str]:
        """Finish the archive (two zero blocks, record padding) and close the file."""
        end = self.position + 2 * BLOCK
        end += -end % RECORD
        self._pending.append(bytes(end - self.position))
        self.position = end
        self._flush()
        os.close(self._fd)
        self._fd = -1
        return self.position, self._sha.hexdigest()

    def abort(self) -> None:
        """Close without finishing (the caller removes the partial file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
