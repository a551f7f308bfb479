"""`root/<identity>/<image>` folders, and WebFace42M roots (`root/<part>/<identity>/<image>`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.cli import UserError
from data_engine.sources.base import Identity, Imap, Scan, Source, SourceFile, listing_digest

# WebFace260M's cleaned WebFace42M ships as parts 0..9; the smaller sets are its prefixes.
WEBFACE_PARTS = {
    "webface4m": 1,
    "webface8m": 2,
    "webface12m": 3,
    "webface21m": 5,
    "webface42m": 10,
}
_SCAN_CHUNK = 64  # identity folders per worker task: enough to hide the task overhead


def list_identity(directory: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(name, size) of the files in one identity folder, sorted; and entries we cannot use."""
    files, rejected = [], []
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = os.path.join(directory, entry.name)
            try:
                if entry.is_dir():
                    rejected.append((path, "folder inside an identity folder (not read)"))
                elif entry.is_file():
                    files.append((entry.name, entry.stat().st_size))
                elif entry.is_symlink():
                    rejected.append((path, "unreadable (broken symlink)"))
                else:
                    rejected.append((path, "not a regular file"))
            except OSError as error:
                rejected.append((path, f"unreadable ({error.strerror})"))
    return files, rejected


def _scan_chunk(task: tuple[str, list[str]]) -> list[tuple[str, list, list]]:
    base, names = task
    return [(name, *list_identity(os.path.join(base, name))) for name in names]


def read_file(path: str, expected_size: int) -> bytes:
    """Whole file in as few syscalls as possible (the size is known from the scan)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, expected_size + 1)
        if len(data) > expected_size:  # grew since the scan: read the rest too
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
                        scan.rejected.append((os.path.join(base, entry.name),
                                              "not inside an identity folder"))
            tasks += [(prefix, base, names[i:i + _SCAN_CHUNK])
                      for i in range(0, len(names), _SCAN_CHUNK)]
        results = imap(_scan_chunk, [(base, names) for _, base, names in tasks])
        for (prefix, _, _), chunk in zip(tasks, results):
            for name, files, rejected in chunk:
                scan.rejected += rejected
                if not files:
                    scan.empty.append(prefix + name)
                    continue
                digest = listing_digest(f"{n}\t{s}" for n, s in files)
                scan.identities.append(Identity(prefix + name, len(files),
                                                sum(s for _, s in files), digest))
        if not scan.identities:
            raise UserError(f"--root {self.root}: no images found (expected "
                            f"{self.root}/{'<part>/' if self.parts else ''}<identity>/<image>)")
        scan.identities.sort(key=lambda identity: identity.name)
        return scan

    def read_identity(self, identity: Identity) -> Iterator[SourceFile]:
        directory = os.path.join(self.root, identity.name)
        files, _ = list_identity(directory)
        if listing_digest(f"{n}\t{s}" for n, s in files) != identity.digest:
            raise UserError(f"{directory}: files changed while sharding; rerun to re-plan")
        for name, size in files:
            path = os.path.join(directory, name)
            try:
                data = read_file(path, size)
            except OSError as error:
                yield SourceFile(name, path, None, f"unreadable ({error.strerror})")
                continue
            yield SourceFile(name, path, data)
