"""``build_loader``: shards dir -> batches of (identity image, k class images, label).

The epoch plan (:mod:`data_engine.loading.epoch_plan`) fixes every id and flip bit; a backend
only reads (through :class:`ImageSource`) and decodes. This module is the only one that
imports the backends, and it stays importable without torch or DALI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from common.device import resolve_device
from common.errors import UserError
from data_engine.loading.epoch_plan import EpochPlan
from data_engine.loading.image_source import ImageSource
from data_engine.loading.reader import ShardReader

if TYPE_CHECKING:
    from data_engine.loading.batch import Batch

BACKENDS = ("auto", "dali", "torch")


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
                from data_engine.loading.dali_backend import DaliBatches

                self._impl = DaliBatches(self.plan, self.source, device=self.device,
                                         workers=self.workers)
            else:
                from data_engine.loading.torch_backend import TorchBatches

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
