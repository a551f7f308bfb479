"""Checked JPEG bytes by image id: the one place that decides an image is bad, for every backend.

Both backends read through :class:`ImageSource`, so they agree on which images are corrupt
and on what replaces them with ``skip_bad``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from common.errors import UserError
from data_engine.loading.reader import ShardReader

log = logging.getLogger(__name__)

_EOI = b"\xff\xd9"  # some encoders pad after it with zeros
_MAX_WARNINGS = 10  # per process: a damaged shard should not flood the log


class DataError(UserError):
    """Shard data that cannot be decoded; the message names the shard file and byte offset."""


class ImageSource:
    """JPEG bytes by image id, checked before any decoder sees them.

    Checks are cheap (full-length read, SOI marker, header parse with the expected size) so
    truncated or overwritten shard data is caught the same way by every backend. A bad image
    raises :class:`DataError`, or with ``skip_bad`` is replaced by the next good image of the
    same identity (so the label stays right), or by a grey image if none is left.
    Forked workers share the parent's reader (its index arrays are large on big datasets and
    stay shared copy-on-write); a pickled copy (spawn) reopens the shards dir on first use.
    """

    def __init__(self, shards_dir: Path, image_size: int, skip_bad: bool,
                 reader: ShardReader | None = None) -> None:
        self.shards_dir = Path(shards_dir)
        self.image_size = image_size
        self.skip_bad = skip_bad
        self._reader = reader
        self._warned = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}

    @property
    def reader(self) -> ShardReader:
        if self._reader is None:
            self._reader = ShardReader(self.shards_dir)
        return self._reader

    def where(self, image_id: int) -> str:
        """Human-readable location of an image, for error messages."""
        reader = self.reader
        shard = reader.shard_paths[int(reader.image_shard[image_id])]
        return (f"{shard} at byte offset {int(reader.image_offset[image_id])} "
                f"(image id {image_id}, label {int(reader.image_labels[image_id])})")

    def problem(self, data: bytes, expected: int) -> str | None:
        """Why ``data`` (``expected`` bytes by the index) is unusable, or None if it looks fine."""
        import simplejpeg

        if len(data) != expected:
            return f"truncated: read {len(data)} of {expected} bytes"
        if data[:2] != b"\xff\xd8":
            return "not a JPEG (no start-of-image marker)"
        if not (data.endswith(_EOI) or data.rstrip(b"\x00").endswith(_EOI)):
            return "truncated JPEG (no end-of-image marker)"
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as error:
            return f"corrupt JPEG header: {error}"
        if (height, width) != (self.image_size, self.image_size):
            return f"JPEG is {width}x{height}, expected {self.image_size}x{self.image_size}"
        return None

    def read_many(self, image_ids: np.ndarray) -> tuple[list[bytes], int]:
        """Checked bytes of these images, bad ones replaced, and how many were replaced.

        One pread per image with the index lookups done for all ids at once: this loop runs
        for every training image, so it avoids per-image numpy indexing.
        """
        reader = self.reader
        out = []
        replaced = 0
        for image_id, shard, offset, length in zip(image_ids.tolist(),
                                                   reader.image_shard[image_ids].tolist(),
                                                   reader.image_offset[image_ids].tolist(),
                                                   reader.image_bytes[image_ids].tolist()):
            try:
                data = os.pread(reader.fd(shard), length, offset)
                why = self.problem(data, length)
            except (OSError, UserError) as error:  # UserError: the shard cannot be opened
                why = f"unreadable ({error})"
            if why is not None:
                data = self.replace(image_id, why)
                replaced += 1
            out.append(data)
        return out, replaced

    def replace(self, image_id: int, why: str) -> bytes:
        """The stand-in for a bad image, or DataError when ``skip_bad`` is off."""
        if not self.skip_bad:
            raise DataError(f"bad image in {self.where(image_id)}: {why}; "
                            "rerun with --skip-bad to skip such images")
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            log.warning("skipping bad image in %s: %s%s", self.where(image_id), why,
                        " (further ones are only counted)" if self._warned == _MAX_WARNINGS
                        else "")
        reader = self.reader
        label = int(reader.image_labels[image_id])
        first, end = int(reader.identity_start[label]), int(reader.identity_start[label + 1])
        for offset in range(1, end - first):
            other = first + (image_id - first + offset) % (end - first)
            data, other_why = self._read_checked(other)
            if other_why is None:
                return data
        return _grey_jpeg(self.image_size)

    def _read_checked(self, image_id: int) -> tuple[bytes, str | None]:
        try:
            data = self.reader.read_image(image_id)
        except (OSError, UserError) as error:  # the reader reports short reads as UserError
            return b"", f"unreadable ({error})"
        return data, self.problem(data, int(self.reader.image_bytes[image_id]))


def _grey_jpeg(size: int) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.full((size, size, 3), 128, np.uint8), quality=95)
