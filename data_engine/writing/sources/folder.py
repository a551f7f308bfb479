"""`root/<identity>/<image>` folders, and WebFace42M roots (`root/<part>/<identity>/<image>`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import UserError
from data_engine.writing.sources.base import (
    Identity,
    Imap,
    Scan,
    Source,
    SourceFile,
    listing_digest,
)

# WebFace260M's cleaned WebFace42M ships as parts 0..9; the smaller sets are its prefixes.
WEBFACE_PARTS = {
    "webface4m": 1,
    "webface8m": 2,
    "webface12m": 3,
    "webface21m": 5,
    "webface42m": 10,
}
_SCAN_CHUNK = 64  # identity folders per worker task: enough to hide the task overhead
_READ_CHUNK = 1 << 16  # one read() covers an aligned face JPEG; larger files loop


def list_identity(directory: str) -> tuple[list[os.DirEntry], list[tuple[str, str]]]:
    """The files of one identity folder sorted by name, and the entries we cannot use.

    No file is stat'ed: directory entries carry their type, which keeps a 42M-file scan to
    one getdents pass instead of 42M stat calls.
    """
    files, rejected = [], []
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                if entry.is_file():
                    files.append(entry)
                elif entry.is_dir():
                    rejected.append((entry.path, "folder inside an identity folder (not read)"))
                elif entry.is_symlink():
                    rejected.append((entry.path, "unreadable (broken symlink)"))
                else:
                    rejected.append((entry.path, "not a regular file"))
            except OSError as error:
                rejected.append((entry.path, f"unreadable ({error.strerror})"))
    return files, rejected


def _summary(base: str, name: str) -> tuple[str, int, int, str, list[tuple[str, str]]]:
    """(name, files, estimated bytes, digest, rejected) of one identity folder.

    Bytes are estimated as files x the first file's size (one stat per identity: aligned
    crops of one person are of similar size, and the estimate only places shard
    boundaries). The digest covers names and inode numbers, so a rerun notices files that
    were added, removed or replaced.
    """
    files, rejected = list_identity(f"{base}/{name}")
    if not files:
        return name, 0, 0, "", rejected
    try:
        first_size = files[0].stat().st_size
    except OSError:
        first_size = 0  # unreadable: the worker rejects it with the reason
    digest = listing_digest(f"{entry.name}\t{entry.inode()}" for entry in files)
    return name, len(files), len(files) * first_size, digest, rejected


def _scan_chunk(task: tuple[str, list[str]]) -> list[tuple[str, int, int, str, list]]:
    """Summaries of some identity folders: only these travel back to the parent."""
    base, names = task
    return [_summary(base, name) for name in names]


def read_file(path: str) -> bytes:
    """Whole file in as few syscalls as possible: open, one read, close for a face crop."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, _READ_CHUNK)
        if len(data) == _READ_CHUNK:  # a short read on a regular file is its end
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data
    finally:
        os.close(fd)


class FolderSource(Source):
    """Identity = folder name (WebFace: `<part>/<folder>`); images = its files, sorted."""

    def __init__(self, root: Path, parts: int | None = None, kind: str = "folder") -> None:
        self.kind = kind
        self.root = Path(os.path.abspath(root))
        self.parts = parts

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root)}

    def _bases(self) -> list[tuple[str, str]]:
        """(name prefix, folder holding identity folders) for each part."""
        if self.parts is None:
            return [("", str(self.root))]
        bases = []
        for part in range(self.parts):
            folder = self.root / str(part)
            if not folder.is_dir():
                raise UserError(f"--root {self.root}: WebFace part {part} is missing "
                                f"({folder} is not a folder; --src {self.kind} needs parts "
                                f"0..{self.parts - 1})")
            bases.append((f"{part}/", str(folder)))
        return bases

    def scan(self, imap: Imap) -> Scan:
        scan = Scan(identities=[])
        tasks = []
        for prefix, base in self._bases():
            with os.scandir(base) as entries:
                names = []
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.is_dir():
                        names.append(entry.name)
                    else:
                        scan.rejected.append((entry.path, "not inside an identity folder"))
            tasks += [(prefix, base, names[i:i + _SCAN_CHUNK])
                      for i in range(0, len(names), _SCAN_CHUNK)]
        results = imap(_scan_chunk, [(base, names) for _, base, names in tasks])
        for (prefix, _, _), chunk in zip(tasks, results):
            for name, num_files, num_bytes, digest, rejected in chunk:
                scan.rejected += rejected
                if num_files:
                    scan.identities.append(Identity(prefix + name, num_files, num_bytes, digest))
                else:
                    scan.empty.append(prefix + name)
        if not scan.identities:
            raise UserError(f"--root {self.root}: no images found (expected "
                            f"{self.root}/{'<part>/' if self.parts else ''}<identity>/<image>)")
        scan.identities.sort(key=lambda identity: identity.name)
        return scan

    def read_identity(self, identity: Identity) -> Iterator[SourceFile]:
        directory = f"{self.root}/{identity.name}"
        files, _ = list_identity(directory)
        if len(files) != identity.num_files:
            raise UserError(f"{directory}: files changed while sharding; rerun to re-plan")
        for entry in files:
            try:
                data = read_file(entry.path)
            except OSError as error:
                yield SourceFile(entry.name, entry.path, None, f"unreadable ({error.strerror})")
                continue
            yield SourceFile(entry.name, entry.path, data)
