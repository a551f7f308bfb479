"""Random access to a shards dir: image bytes by global id via pread, no tar scanning.

Image ids are global and in label order: the images of label i are
identity_start[i] .. identity_start[i+1]-1. Importable without torch; safe to pickle into
loader worker processes (file handles are reopened lazily in each process).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from common.errors import UserError
from data_engine.layout import (
    IDENTITIES,
    INDEX,
    INDEX_ARRAYS,
    INDEX_IMAGE_BYTES,
    read_manifest,
)


class ShardReader:
    """Open a shards dir written by `python -m data_engine.shard`."""

    def __init__(self, shards_dir: str | os.PathLike) -> None:
        self.root = Path(shards_dir)
        self.manifest = read_manifest(self.root)
        try:
            with np.load(self.root / INDEX, allow_pickle=False) as index:
                arrays = {name: index[name] for name in INDEX_ARRAYS}
            names = (self.root / IDENTITIES).read_text("utf-8", "surrogateescape").splitlines()
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:  # CRC: bit flip
            raise UserError(f"{self.root}: {INDEX}/{IDENTITIES} missing or invalid "
                            f"({error})") from None
        self.identity_start: np.ndarray = arrays["identity_start"]
        self.image_shard: np.ndarray = arrays["image_shard"]
        self.image_offset: np.ndarray = arrays["image_offset"]
        self.image_bytes: np.ndarray = arrays[INDEX_IMAGE_BYTES]  # JPEG length of each
        self._names = names
        self.num_identities = int(self.manifest.get("num_identities", -1))
        self.num_images = int(self.manifest.get("num_images", -1))
        self.shard_paths = [self.root / shard["name"] for shard in self.manifest["shards"]]
        if (len(names) != self.num_identities
                or len(self.identity_start) != self.num_identities + 1
                or int(self.identity_start[-1]) != self.num_images
                or not len(self.image_shard) == len(self.image_offset)
                == len(self.image_bytes) == self.num_images):
            raise UserError(f"{self.root}: {INDEX} or {IDENTITIES} does not match "
                            "manifest.json (rerun python -m data_engine.shard)")
        self._check_bounds()
        self.image_labels = np.repeat(np.arange(self.num_identities, dtype=np.int64),
                                      np.diff(self.identity_start))
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _check_bounds(self, chunk: int = 1 << 20) -> None:
        """Every image lies inside its shard as manifest.json sizes it (an edited or damaged
        index would otherwise read other images' bytes); in chunks, for 42M images."""
        sizes = np.array([int(shard["bytes"]) for shard in self.manifest["shards"]], np.int64)
        for start in range(0, self.num_images, chunk):
            shard = self.image_shard[start:start + chunk].astype(np.int64)
            offset = self.image_offset[start:start + chunk]
            if (shard < 0).any() or (shard >= len(sizes)).any():
                bad = start + int(np.flatnonzero((shard < 0) | (shard >= len(sizes)))[0])
                raise UserError(f"{self.root / INDEX}: image {bad} is in shard "
                                f"{int(self.image_shard[bad])}, manifest.json lists "
                                f"{len(sizes)} shards (rerun python -m data_engine.shard)")
            outside = (offset < 0) | (offset + self.image_bytes[start:start + chunk]
                                      > sizes[shard])
            if outside.any():
                bad = start + int(np.flatnonzero(outside)[0])
                raise UserError(f"{self.root / INDEX}: image {bad} at bytes "
                                f"{int(self.image_offset[bad])}+{int(self.image_bytes[bad])} "
                                f"lies outside {self.shard_paths[int(self.image_shard[bad])].name}"
                                f" ({int(sizes[int(self.image_shard[bad])])} bytes in "
                                "manifest.json; rerun python -m data_engine.shard)")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files (they reopen on the next read)."""
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def fd(self, shard: int) -> int:
        """Read-only descriptor of shard ``shard``, opened once per process."""
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to use
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.shard_paths[shard], os.O_RDONLY)
            except OSError as error:
                raise UserError(f"{self.shard_paths[shard]}: cannot open shard "
                                f"({error.strerror})") from None
            self._fds[shard] = fd
        return fd

    def read_image(self, image_id: int) -> bytes:
        """JPEG bytes of global image `image_id` (one pread)."""
        length = int(self.image_bytes[image_id])
        data = os.pread(self.fd(int(self.image_shard[image_id])), length,
                        int(self.image_offset[image_id]))
        if len(data) != length:
            raise UserError(f"{self.shard_paths[int(self.image_shard[image_id])]}: shard is "
                            f"shorter than its index (image {image_id})")
        return data

    def identity_name(self, label: int) -> str:
        """Original identity name of `label` (folder name, record ordinal, ...)."""
        return self._names[label]

    def identity_images(self, label: int) -> range:
        """Global image ids of `label`."""
        return range(int(self.identity_start[label]), int(self.identity_start[label + 1]))

    def iter_identities(self) -> Iterator[tuple[int, str, list[bytes]]]:
        """(label, name, jpeg bytes in sample order) for every identity, in label order."""
        for label in range(self.num_identities):
            yield (label, self._names[label],
                   [self.read_image(i) for i in self.identity_images(label)])
