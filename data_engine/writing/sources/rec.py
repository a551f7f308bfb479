"""insightface `train.rec`/`train.idx` (MS1MV3, Glint360K...), with or without header record 0.

With the header (what insightface's face datasets ship), record 0 has no image and labels
[first, end): records first..end-1 each give one identity's image-record range [start, end).
Without it (shuffled im2rec output) every record is an image carrying its own label, and
identities are formed by grouping equal labels.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from data_engine.writing.recordio import IR_HEADER, RecordFile, read_idx
from data_engine.writing.sources.base import Identity, Imap, Scan, Source, SourceFile

_HEADER_FLAG = 2  # record 0 and identity records carry a [start, end) label pair


def _find(sorted_keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions of `wanted` in `sorted_keys`, -1 where absent."""
    positions = np.searchsorted(sorted_keys, wanted)
    clipped = np.minimum(positions, len(sorted_keys) - 1)
    return np.where(sorted_keys[clipped] == wanted, clipped, -1)


class RecordIOSource(Source):
    """Identity name = label as 8 digits (header-less) or identity-record ordinal (header)."""

    def __init__(self, root: Path, kind: str = "rec") -> None:
        self.kind = kind
        self.root = Path(os.path.abspath(root))
        self.rec_path = self.root / "train.rec"
        self.idx_path = self.root / "train.idx"
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise UserError(f"--root {self.root}: {path.name} is missing (--src {kind} "
                                "expects train.rec and train.idx)")
        self._file: RecordFile | None = None
        self._keys = self._offsets = self._starts = np.zeros(0, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root)}

    def scan(self, imap: Imap) -> Scan:
        del imap  # the index is read vectorised in one go; no need to spread it
        keys, offsets = read_idx(self.idx_path)
        records = RecordFile(self.rec_path)
        lengths = records.check(offsets)
        header = None
        if keys[0] == 0:
            first = records.read(int(offsets[0]))
            if first.flag == _HEADER_FLAG and not first.payload:
                header = (int(first.labels[0]), int(first.labels[1]))
        scan = Scan(identities=[])
        if header is None:
            groups = self._group_by_label(records, keys, offsets, scan)
        else:
            groups = self._groups_from_header(records, keys, offsets, header, scan)
        self._file = records
        image_keys, image_offsets, starts = [], [], [0]
        for ref, (name, group) in enumerate(groups):
            positions = np.searchsorted(keys, group)
            image_keys.append(group)
            image_offsets.append(offsets[positions])
            starts.append(starts[-1] + len(group))
            digest = hashlib.sha1(group.tobytes() + offsets[positions].tobytes()
                                  + lengths[positions].tobytes(),
                                  usedforsecurity=False).hexdigest()[:16]
            payload_bytes = int(lengths[positions].sum()) - len(group) * IR_HEADER.size
            scan.identities.append(Identity(name, len(group), payload_bytes, digest, ref=ref))
        if not scan.identities:
            raise UserError(f"{self.rec_path}: no image records found")
        self._keys = np.concatenate(image_keys)
        self._offsets = np.concatenate(image_offsets)
        self._starts = np.asarray(starts, dtype=np.int64)
        scan.identities.sort(key=lambda identity: identity.name)
        return scan

    def _groups_from_header(self, records: RecordFile, keys: np.ndarray, offsets: np.ndarray,
                            header: tuple[int, int], scan: Scan) -> list[tuple[str, np.ndarray]]:
        first, end = header
        groups, covered = [], []
        for ordinal, key in enumerate(range(first, end)):
            position = _find(keys, np.array([key]))
            if position[0] < 0:
                raise UserError(f"{self.idx_path}: identity record {key} (from header record "
                                f"0's range [{first}, {end})) is missing")
            labels = records.read(int(offsets[position[0]])).labels
            if len(labels) < 2:
                raise UserError(f"{self.rec_path}: identity record {key} has no [start, end) "
                                "label pair")
            start, stop = int(labels[0]), int(labels[1])
            wanted = np.arange(start, stop, dtype=np.int64)
            present = _find(keys, wanted) >= 0
            for missing in wanted[~present].tolist():
                scan.rejected.append((f"{self.rec_path}#{missing}", "missing from train.idx"))
            name = f"{ordinal:08d}"
            if present.any():
                groups.append((name, wanted[present]))
            else:
                scan.empty.append(name)
            covered.append(wanted)
        inside = np.zeros(len(keys), dtype=bool)
        for wanted in covered:
            found = _find(keys, wanted)
            inside[found[found >= 0]] = True
        stray = keys[(keys != 0) & ((keys < first) | (keys >= end)) & ~inside]
        for key in stray.tolist():
            scan.rejected.append((f"{self.rec_path}#{key}", "not in any identity record range"))
        return groups

    def _group_by_label(self, records: RecordFile, keys: np.ndarray, offsets: np.ndarray,
                        scan: Scan) -> list[tuple[str, np.ndarray]]:
        labels = records.class_labels(offsets).astype(np.float64)
        bad = ~np.isfinite(labels) | (labels < 0) | (labels != np.floor(labels))
        for key in keys[bad].tolist():
            scan.rejected.append((f"{self.rec_path}#{key}", "label is not a class number"))
        keys, labels = keys[~bad], labels[~bad].astype(np.int64)
        order = np.lexsort((keys, labels))
        keys, labels = keys[order], labels[order]
        cuts = np.flatnonzero(np.diff(labels)) + 1
        return [(f"{int(group_labels[0]):08d}", group_keys)
                for group_keys, group_labels in zip(np.split(keys, cuts), np.split(labels, cuts))
                if len(group_keys)]

    def read_identity(self, identity: Identity) -> Iterator[SourceFile]:
        if self._file is None:
            raise RuntimeError("scan() must run before read_identity()")
        start, stop = self._starts[identity.ref], self._starts[identity.ref + 1]
        for key, offset in zip(self._keys[start:stop].tolist(),
                               self._offsets[start:stop].tolist()):
            yield SourceFile(str(key), f"{self.rec_path}#{key}",
                             self._file.read(offset).payload)
