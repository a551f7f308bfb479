"""MXNet RecordIO (`train.rec` + `train.idx`) as insightface writes it, read without mxnet.

A record is: uint32 magic 0xced7230a; uint32 with the continuation flag in the upper 3 bits
and the payload length in the lower 29; the payload; zero padding to 4 bytes. insightface
payloads start with an IRHeader (`IfQQ`: flag, label, id, id2); when flag > 0, `flag` float32
labels follow (and the scalar label is unused); the rest is the encoded image.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError

MAGIC = 0xCED7230A
_LENGTH_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct("<IfQQ")


@dataclass(frozen=True)
class Record:
    flag: int
    labels: tuple[float, ...]  # one label, or `flag` labels
    payload: bytes


def read_idx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) from `key\\toffset` lines, sorted by key."""
    try:
        table = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2)
    except ValueError as error:
        raise UserError(f"{path}: not a RecordIO index (expected 'key<TAB>offset' lines: "
                        f"{error})") from None
    if table.size == 0:
        raise UserError(f"{path}: empty RecordIO index")
    if table.shape[1] != 2:
        raise UserError(f"{path}: expected 2 columns 'key<TAB>offset', got {table.shape[1]}")
    order = np.argsort(table[:, 0], kind="stable")
    return table[order, 0], table[order, 1]


class RecordFile:
    """Random access to records by byte offset through one read-only mmap."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            self.size = os.fstat(handle.fileno()).st_size
            if self.size == 0:
                raise UserError(f"{path}: empty RecordIO file")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def __getstate__(self) -> dict:  # workers re-open the file instead of pickling the map
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def check(self, offsets: np.ndarray) -> np.ndarray:
        """Validate magic and bounds of every record at once; returns payload lengths."""
        bad = (offsets < 0) | (offsets % 4 != 0) | (offsets + 8 > self.size)
        if bad.any():
            offset = int(offsets[bad.argmax()])
            raise UserError(f"{self.path}: record offset {offset} from train.idx is outside "
                            f"the file ({self.size} bytes) or not 4-byte aligned")
        words = np.frombuffer(self._map, dtype="<u4", count=self.size // 4)
        magic = words[offsets // 4]
        if (magic != MAGIC).any():
            offset = int(offsets[(magic != MAGIC).argmax()])
            raise UserError(f"{self.path}: bad RecordIO magic at offset {offset} "
                            f"(0x{int(magic[(magic != MAGIC).argmax()]):08x}, expected "
                            f"0x{MAGIC:08x}); not an MXNet .rec file?")
        word = words[offsets // 4 + 1]
        lengths = (word & _LENGTH_MASK).astype(np.int64)
        if (word >> 29).any():
            offset = int(offsets[(word >> 29).astype(bool).argmax()])
            raise UserError(f"{self.path}: multi-part record at offset {offset} is not "
                            "supported")
        short = lengths < IR_HEADER.size
        if short.any():
            raise UserError(f"{self.path}: record at offset {int(offsets[short.argmax()])} is "
                            "shorter than its IRHeader")
        ends = offsets + 8 + lengths
        if (ends > self.size).any():
            i = int((ends > self.size).argmax())
            raise UserError(f"{self.path}: truncated record at offset {int(offsets[i])} "
                            f"(needs {int(lengths[i])} bytes, the file ends "
                            f"{self.size - int(offsets[i]) - 8} bytes after its header)")
        return lengths

    def class_labels(self, offsets: np.ndarray) -> np.ndarray:
        """The class label of every (checked) record at once: the IRHeader label, or the
        first of the float labels that follow it when flag > 0."""
        words = np.frombuffer(self._map, dtype="<u4", count=self.size // 4)
        header = offsets // 4 + 2  # the IRHeader follows the magic and length words
        first_extra = np.minimum(header + IR_HEADER.size // 4, len(words) - 1)
        floats = words.view("<f4")
        return np.where(words[header] > 0, floats[first_extra], floats[header + 1])

    def read(self, offset: int) -> Record:
        """The record at `offset` (already checked by `check`)."""
        magic, word = struct.unpack_from("<II", self._map, offset)
        length = word & _LENGTH_MASK
        if magic != MAGIC or offset + 8 + length > self.size:
            raise UserError(f"{self.path}: bad or truncated record at offset {offset}")
        start = offset + 8
        if length < IR_HEADER.size:
            raise UserError(f"{self.path}: record at offset {offset} is shorter than its "
                            "IRHeader")
        flag, label, _, _ = IR_HEADER.unpack_from(self._map, start)
        start += IR_HEADER.size
        labels: tuple[float, ...] = (label,)
        if flag > 0:
            if start + 4 * flag > offset + 8 + length:
                raise UserError(f"{self.path}: record at offset {offset} claims {flag} labels, "
                                "more than it holds")
            labels = struct.unpack_from(f"<{flag}f", self._map, start)
            start += 4 * flag
        return Record(flag, labels, self._map[start:offset + 8 + length])
