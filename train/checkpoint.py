"""Checkpoints that survive crashes: atomic writes, a few kept, corrupt ones skipped.

A run that is killed (power loss, OOM killer, full disk) while saving must still resume from
the previous checkpoint, so a file is only ever visible under its final name once complete:
write to a temp file in the same directory, fsync, rename, fsync the directory.
Everything stored is tensors or plain Python values, so loading uses
``torch.load(weights_only=True)`` and never runs pickled code.

A checkpoint does not depend on how many ranks wrote it: a model-parallel head's class rows
are gathered into the whole matrix (:func:`gather_rows`) and rank 0 writes the one file; a
run on another number of ranks takes its own rows back out (:func:`take_rows`).
"""

from __future__ import annotations

import logging
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.files import write_atomic
from model.heads import Ranks
from model.heads.collective import class_range

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` that leaves either the old file or the complete new one, never half."""
    write_atomic(Path(path), lambda file: torch.save(obj, file))


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``step-NNNNNNNNN.pt`` atomically and delete all but the ``keep`` newest."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:09d}.pt"
    atomic_save(state, path)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest (highest step) first; temp files are never listed."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU without unpickling arbitrary objects, after checking
    every record's CRC-32 (torch.load does not: a flipped bit would load as a wrong weight)."""
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise ValueError(f"CRC-32 mismatch in {damaged}")
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; unreadable ones are reported and skipped."""
    for path in list_checkpoints(directory):
        try:
            return path, load_checkpoint(path)
        except Exception as error:  # truncated / corrupt file: fall back to an older one
            log.warning("skipping unreadable checkpoint %s (%s)", path, error)
    return None


def rng_state() -> dict[str, Any]:
    """Every global RNG the step may touch, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rows(local: torch.Tensor, num_rows: int, ranks: Ranks) -> torch.Tensor | None:
    """The whole [num_rows, ...] tensor, on the CPU of rank 0 (None elsewhere), from every
    rank's class range of it; one range in flight at a time, so no device holds it all."""
    parts = []
    for rank in range(ranks.world_size):
        start, stop = class_range(num_rows, rank, ranks.world_size)
        part = (local.detach().contiguous() if rank == ranks.rank
                else local.new_empty((stop - start, *local.shape[1:])))
        dist.broadcast(part, src=rank, group=ranks.group)
        if ranks.rank == 0:
            parts.append(part.cpu())
    return torch.cat(parts) if ranks.rank == 0 else None


def take_rows(whole: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's class range of a whole [num_rows, ...] tensor from a checkpoint."""
    start, stop = class_range(whole.shape[0], ranks.rank, ranks.world_size)
    return whole[start:stop]
