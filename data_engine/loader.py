"""``build_loader``: shards dir -> batches of (identity image, k class images, label).

The epoch plan (:mod:`data_engine.sampler`) fixes every id and flip bit; a backend only
reads and decodes. Both backends read bytes through :class:`ImageSource`, so they agree on
which images are corrupt and on what replaces them with ``skip_bad``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.cli import UserError
from data_engine.sampler import EpochPlan, StepPlan

if TYPE_CHECKING:
    import torch

    from data_engine.reader import ShardReader

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torch")
_EOI = b"\xff\xd9"  # some encoders pad after it with zeros
_MAX_WARNINGS = 10  # per process: a damaged shard should not flood the log


class DataError(UserError):
    """Shard data that cannot be decoded; the message names the shard file and byte offset."""


@dataclass
class Batch:
    """One training step. Images are RGB uint8, already flipped, in channels-last memory.

    Shapes are NCHW (``identity [B,3,112,112]``, ``classes [B,k,3,112,112]``) but the
    storage is NHWC, as decoders write it: no transpose copy, and channels-last is the fast
    layout for convolutions on GPU. ``classes.flatten(0, 1)`` is a free view.
    """

    identity: torch.Tensor
    classes: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    class_image_ids: torch.Tensor


def batch_from_pixels(step: StepPlan, pixels: torch.Tensor, device: torch.device) -> Batch:
    """Views of one step's decoded NHWC pixels (identity rows first) as a :class:`Batch`."""
    import torch

    batch_size, k = step.class_image_ids.shape
    nchw = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)

    def ids(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device, non_blocking=True)

    return Batch(identity=nchw[:batch_size],
                 classes=nchw[batch_size:].unflatten(0, (batch_size, k)),
                 labels=ids(step.labels), image_ids=ids(step.image_ids),
                 class_image_ids=ids(step.class_image_ids))


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
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._warned = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_fds": {}}

    @property
    def reader(self) -> ShardReader:
        if self._reader is None:
            from data_engine.reader import ShardReader

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
        for image_id, shard, offset, size in zip(image_ids.tolist(),
                                                 reader.image_shard[image_ids].tolist(),
                                                 reader.image_offset[image_ids].tolist(),
                                                 reader.image_size[image_ids].tolist()):
            try:
                data = os.pread(self._fd(shard), size, offset)
                why = self.problem(data, size)
            except OSError as error:
                why = f"unreadable ({error})"
            if why is not None:
                data = self.replace(image_id, why)
                replaced += 1
            out.append(data)
        return out, replaced

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.reader.shard_paths[shard], os.O_RDONLY)
        return fd

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
        return data, self.problem(data, int(self.reader.image_size[image_id]))


def _grey_jpeg(size: int) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.full((size, size, 3), 128, np.uint8), quality=95)


class Loader:
    """Batches of one epoch from ``start_step``; iterate it again to replay the same steps."""

    def __init__(self, plan: EpochPlan, source: ImageSource, *, start_step: int, backend: str,
                 device: str, workers: int, num_classes: int) -> None:
        self.plan = plan
        self.source = source
        self.start_step = start_step
        self.backend = backend
        self.device = device
        self.workers = workers
        self.num_classes = num_classes
        self.num_images = plan.num_images
        self.skipped = 0  # bad images replaced so far (skip_bad=True)
        self._impl = None

    def __len__(self) -> int:
        """Steps per epoch (also when starting mid-epoch: steps run = len - start_step)."""
        return len(self.plan)

    def __iter__(self) -> Iterator[Batch]:
        if self._impl is None:
            if self.backend == "dali":
                from data_engine.decode_dali import DaliBatches

                self._impl = DaliBatches(self.plan, self.source, device=self.device,
                                         workers=self.workers)
            else:
                from data_engine.decode_torch import TorchBatches

                self._impl = TorchBatches(self.plan, self.source, device=self.device,
                                          workers=self.workers)
        for batch, skipped in self._impl.run(self.start_step):
            self.skipped += skipped
            yield batch


def resolve_backend(name: str, device: str) -> str:
    """``auto`` -> dali on a CUDA device when DALI imports, else torch.

    Measured on CPU (2-core EPYC, BENCHMARKS.md): DALI's CPU pipeline costs 1.4-1.5x the
    CPU time per image of the torch backend (129-146 vs 91-95 µs), so a CPU device gets
    torch; DALI earns its place by decoding on the GPU. A backend named explicitly is used
    or reported as unusable.
    """
    if name not in BACKENDS:
        raise UserError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "torch" or (name == "auto" and not device.startswith("cuda")):
        return "torch"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as error:
        if name == "dali":
            raise UserError(f"backend dali: cannot import nvidia.dali ({error}); "
                            "install nvidia-dali-cuda120 or use backend torch") from error
        return "torch"
    return "dali"


def build_loader(shards_dir: str | Path, batch_size: int, k: int, *, seed: int, epoch: int = 0,
                 start_step: int = 0, backend: str = "auto", device: str = "auto",
                 workers: int | None = None, drop_last: bool = True,
                 skip_bad: bool = False) -> Loader:
    """Loader for one epoch of (identity image, k class images, label) batches.

    The batches are a function of (seed, epoch) only; ``start_step`` resumes mid-epoch with
    exactly the steps an uninterrupted run would see. ``backend``: torch, dali, or auto
    (dali on CUDA when installed, else torch). ``workers``: decode processes (torch; 0 =
    decode in this process) or DALI threads; default the CPU count. ``skip_bad``: replace
    unreadable images by another image of the same identity and count them
    (``Loader.skipped``) instead of raising :class:`DataError`.
    """
    from common.device import resolve_device
    from data_engine.reader import ShardReader

    reader = ShardReader(shards_dir)
    plan = EpochPlan(reader.identity_start, batch_size, k, seed=seed, epoch=epoch,
                     drop_last=drop_last)
    if not 0 <= start_step <= len(plan):
        raise UserError(f"start step {start_step} outside 0..{len(plan)} for this epoch")
    size = reader.manifest.get("image_size", 112)
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise UserError(f"{shards_dir}: images are {width}x{height}; the loader needs square "
                        "face crops (112x112)")
    source = ImageSource(Path(shards_dir), int(height), skip_bad, reader)
    device = resolve_device(device)
    return Loader(plan, source, start_step=start_step, backend=resolve_backend(backend, device),
                  device=device, workers=(os.cpu_count() or 1) if workers is None else workers,
                  num_classes=reader.num_identities)
