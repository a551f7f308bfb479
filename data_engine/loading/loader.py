"""``build_loader``: shards dir -> batches of (identity image, k class images, label).

The epoch plan (:mod:`data_engine.loading.epoch_plan`) fixes every id and flip bit; a backend
only reads (through :class:`ImageSource`) and decodes. This module is the only one that
imports the backends, and it stays importable without torch or DALI.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from common.device import resolve_device, usable_cores
from common.errors import UserError
from data_engine.loading.epoch_plan import EpochPlan
from data_engine.loading.image_source import ImageSource
from data_engine.loading.reader import ShardReader

if TYPE_CHECKING:
    from data_engine.loading.batch import Batch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torch")
# The oldest DALI the DALI backend runs on, as pyproject.toml requires: the first release
# with the dynamic executor (exec_dynamic); NGC containers may ship an older one.
MIN_DALI = (1, 44)
# Default decode workers per GPU process at most. At ~90 CPU-µs per image (BENCHMARKS.md)
# 12 cores decode over 100k images/s, far beyond one GPU's step; more only add a pinned
# batch buffer each (torch backend) and threads fighting other ranks for cores.
MAX_DEFAULT_WORKERS = 12


def default_workers(local_ranks: int = 1) -> int:
    """Decode workers (torch processes, DALI threads) when none are asked for: this process's
    share of the node's usable cores (``local_ranks`` processes on the node), at most
    :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cores() // max(1, local_ranks)))


def slot_count(workers: int) -> int:
    """The torch backend's batch buffers (shared memory, pinned on CUDA) for ``workers``
    processes: a step in flight per worker, the next two queued, and two held by the
    caller (its batch and the one before)."""
    return workers + 4


class Loader:
    """Batches of one epoch from ``start_step``; iterate it again to replay the same steps.

    The decode backend (the torch backend's worker processes and pinned buffers) outlives
    the epoch: ``build_loader(..., reuse=previous)`` hands it to the next epoch's loader, and
    :meth:`close` (or leaving a ``with`` block) stops it.
    """

    def __init__(self, plan: EpochPlan, source: ImageSource, *, start_step: int, backend: str,
                 device: str, workers: int, num_classes: int,
                 reuse: Loader | None = None) -> None:
        self.plan = plan
        self.source = source
        self.start_step = start_step
        self.backend = backend
        self.device = device
        self.workers = workers
        self.num_classes = num_classes
        self.num_images = plan.num_images
        self.skipped = 0  # bad images replaced so far (skip_bad=True)
        if reuse is not None and reuse._shares_with(self):
            self._impl = reuse._impl
        else:
            if reuse is not None:
                reuse.close()
            self._impl = self._make_backend()

    def _make_backend(self):
        if self.backend == "dali":
            from data_engine.loading.dali_backend import DaliBatches

            return DaliBatches(self.source, device=self.device, workers=self.workers)
        from data_engine.loading.torch_backend import TorchBatches

        return TorchBatches(self.source, device=self.device, workers=self.workers,
                            slots=slot_count(self.workers))

    def _shares_with(self, other: Loader) -> bool:
        """Whether ``other`` (a later epoch) can use this loader's backend as it is."""
        return (self.backend, self.device, self.workers, self.source.shards_dir,
                self.source.image_size, self.source.skip_bad) == (
                other.backend, other.device, other.workers, other.source.shards_dir,
                other.source.image_size, other.source.skip_bad)

    def __len__(self) -> int:
        """Steps per epoch (also when starting mid-epoch: steps run = len - start_step)."""
        return len(self.plan)

    def __iter__(self) -> Iterator[Batch]:
        for batch, skipped in self._impl.run(self.plan, self.start_step):
            self.skipped += skipped
            yield batch

    def start(self) -> None:
        """Start the decode workers now instead of at the first batch: a training run calls
        this before it touches CUDA, so the workers are forked from a process without a
        CUDA context (they never use CUDA either way)."""
        self._impl.start(self.plan)

    def close(self) -> None:
        """Stop the backend's workers and release its buffers (also those shared by reuse)."""
        self._impl.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
        import nvidia.dali
    except ImportError as error:
        if name == "dali":
            raise UserError(f"backend dali: cannot import nvidia.dali ({error}); "
                            "install nvidia-dali-cuda120 or use backend torch") from error
        return "torch"
    problem = dali_version_problem(nvidia.dali.__version__)
    if problem is None:
        return "dali"
    if name == "dali":
        raise UserError(f"backend dali: {problem}; upgrade it (pip install -U "
                        "nvidia-dali-cuda120) or use backend torch")
    log.warning("backend auto: %s; using the torch backend", problem)
    return "torch"


def dali_version_problem(version: str) -> str | None:
    """Why this DALI release cannot run the DALI backend (too old), or None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"unrecognised DALI version {version!r}"
    if (int(match.group(1)), int(match.group(2))) < MIN_DALI:
        return (f"DALI {version} is older than {MIN_DALI[0]}.{MIN_DALI[1]}, the first "
                "with the dynamic executor")
    return None


def build_loader(shards_dir: str | Path, batch_size: int, k: int, *, seed: int, epoch: int = 0,
                 start_step: int = 0, backend: str = "auto", device: str = "auto",
                 workers: int | None = None, drop_last: bool = True,
                 skip_bad: bool = False, reuse: Loader | None = None, rank: int = 0,
                 world_size: int = 1, local_ranks: int = 1) -> Loader:
    """Loader for one epoch of (identity image, k class images, label) batches.

    The batches are a function of (seed, epoch) only; ``start_step`` resumes mid-epoch with
    exactly the steps an uninterrupted run would see. ``backend``: torch, dali, or auto
    (dali on CUDA when installed, else torch). ``workers``: decode processes (torch; 0 =
    decode in this process) or DALI threads; default :func:`default_workers` of
    ``local_ranks`` (the processes on this node sharing its cores). ``skip_bad``: replace
    unreadable images by another image of the same identity and count them
    (``Loader.skipped``) instead of raising :class:`DataError`. ``reuse``: the loader of an
    earlier epoch of the same run, whose decode workers this one takes over (forked and
    pinned once per run, not per epoch); one with other settings is closed instead.
    ``rank``/``world_size``: this process's slice of every global batch of ``world_size ×
    batch_size`` samples (``len()`` counts global steps).
    """
    if reuse is not None and reuse.source.shards_dir == Path(shards_dir):
        reader = reuse.source.reader  # the index stays in memory once, not once per epoch
    else:
        reader = ShardReader(shards_dir)
    plan = EpochPlan(reader.identity_start, batch_size, k, seed=seed, epoch=epoch,
                     drop_last=drop_last, rank=rank, world_size=world_size)
    if not 0 <= start_step <= len(plan):
        raise UserError(f"start step {start_step} outside 0..{len(plan)} for this epoch")
    size = reader.manifest.get("image_size", 112)
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise UserError(f"{shards_dir}: images are {width}x{height}; the loader needs square "
                        "face crops (112x112)")
    source = ImageSource(Path(shards_dir), int(height), skip_bad, reader)
    device = resolve_device(device)
    if workers is None:
        workers = default_workers(local_ranks)
    return Loader(plan, source, start_step=start_step, backend=resolve_backend(backend, device),
                  device=device, workers=workers, num_classes=reader.num_identities,
                  reuse=reuse)
