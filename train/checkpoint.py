"""Checkpoints that survive crashes: atomic writes, a few kept, corrupt ones skipped.

A run that is killed (power loss, OOM killer, full disk) while saving must still resume from
the previous checkpoint, so a file is only ever visible under its final name once complete:
write to a temp file in the same directory, fsync, rename, fsync the directory.
Everything stored is tensors or plain Python values, so loading uses
``torch.load(weights_only=True)`` and never runs pickled code.

A checkpoint does not depend on how many ranks wrote it: a model-parallel head's class rows
are gathered into the whole matrix (:func:`gather_rows`) and rank 0 writes the one file; a
run on another number of ranks takes its own rows back out (:func:`take_rows`).
:func:`save_state` and :func:`restore_state` move a run's live objects (:class:`RunParts`)
into such a file and back.
"""

from __future__ import annotations

import logging
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from common.errors import UserError
from common.files import write_atomic
from common.run_folder import checkpoint_name, is_checkpoint_name
from model.heads import Ranks
from model.heads.collective import class_range
from train.distributed import World
from train.image_stats import ImageStats

log = logging.getLogger(__name__)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` that leaves either the old file or the complete new one, never half."""
    write_atomic(Path(path), lambda file: torch.save(obj, file))


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``step-NNNNNNNNN.pt`` atomically and delete all but the ``keep`` newest."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(step)
    atomic_save(state, path)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest (highest step) first; temp files are never listed."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if is_checkpoint_name(p.name)]
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


def rng_state(device: str) -> dict[str, Any]:
    """Every global RNG the step may touch, as tensors and plain values: on CUDA, the
    generator of this process's own GPU only (the others are no rank's, unadvanced)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: str) -> None:
    """Restore what :func:`rng_state` captured; a CUDA state goes to this process's GPU,
    whichever rank or GPU saved it (under torchrun every rank's generator is rank 0's)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.device(device).type == "cuda":
        saved = state["cuda"]
        if isinstance(saved, list):  # older checkpoints: every GPU rank 0 saw, its own first
            saved = saved[0]
        torch.cuda.set_rng_state(saved, device)


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


@dataclass
class RunParts:
    """The live objects whose state a checkpoint holds."""

    backbone: nn.Module
    head: nn.Module  # a model.heads.Head
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler
    image_stats: ImageStats | None
    world: World
    device: str


def save_state(parts: RunParts, record: dict[str, Any], *, ckpt_dir: Path, run_dir: Path,
               keep: int) -> Path | None:
    """Checkpoint the run at ``record["position"]["step"]``; every rank takes part (a split
    head and the image statistics are gathered), rank 0 writes the checkpoint and
    RUN/image_stats.npz and gets the checkpoint's path, the others None.

    ``record``: what the loop adds as it is (position, network, dataset, global batch).
    """
    head, optimizer = _whole_head_state(parts)
    image_stats = _whole_image_stats(parts)
    if not parts.world.is_main:
        return None
    state = {
        "position": record["position"],
        "backbone": parts.backbone.state_dict(),
        "head": head,
        "optimizer": optimizer,
        "scaler": parts.scaler.state_dict(),
        "rng": rng_state(parts.device),
        **{key: value for key, value in record.items() if key != "position"},
        "world_size": parts.world.world_size,
    }
    if image_stats is not None:
        state["image_stats"] = image_stats.state_dict()
        image_stats.write(run_dir)
    return save_checkpoint(ckpt_dir, record["position"]["step"], state, keep)


def restore_state(parts: RunParts, state: dict[str, Any]) -> None:
    """Put a checkpoint's state back into the live objects (this rank's rows of a split
    head); the caller checked it belongs to this run (:func:`check_resumable`)."""
    parts.backbone.load_state_dict(state["backbone"])
    head, optimizer = state["head"], state["optimizer"]
    if parts.head.weight_rows is not None:  # this rank's rows only
        ranks = parts.world.ranks
        index = _optimizer_index(parts.optimizer, parts.head.weight)
        moment = optimizer["state"][index]
        head = {**head, "weight": take_rows(head["weight"], ranks)}
        optimizer = {**optimizer, "state": {**optimizer["state"], index: {
            **moment, "momentum_buffer": take_rows(moment["momentum_buffer"], ranks)}}}
    parts.head.load_state_dict(head)
    parts.optimizer.load_state_dict(optimizer)
    _lay_momentum_like_params(parts.optimizer)
    _load_scaler(parts.scaler, state["scaler"])
    # The sums are the whole run's: one rank continues them, the others add to zero.
    if parts.image_stats is not None and "image_stats" in state and parts.world.is_main:
        parts.image_stats.load_state_dict(state["image_stats"])
    set_rng_state(state["rng"], parts.device)


def _lay_momentum_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Each momentum buffer in its parameter's memory layout. ``load_state_dict`` keeps the
    saving run's strides (channels-last convs from a CUDA run, NCHW from a CPU one), and the
    fused SGD kernel pairs buffer and parameter element by element in memory order: another
    layout applies momentum to the wrong weights on the CPU and is refused on CUDA."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            buffer = state.get("momentum_buffer")
            if buffer is not None and buffer.stride() != param.stride():
                state["momentum_buffer"] = torch.empty_like(param).copy_(buffer)


def _load_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any]) -> None:
    """The fp16 loss scaler's state; a run resumed in fp16 from a bf16/fp32 checkpoint (no
    scaler state) starts the scaler afresh, as a new run does."""
    if scaler.is_enabled() and not saved:
        log.info("--precision fp16: the checkpoint holds no loss-scaler state (written in "
                 "bf16 or fp32); the scaler starts afresh")
        return
    scaler.load_state_dict(saved)


def _whole_head_state(parts: RunParts) -> tuple[dict[str, Any], dict[str, Any]]:
    """Head and optimizer state as one process holds them: a split head's rows (and
    their momentum) gathered into the whole matrix on rank 0 (all ranks take part)."""
    head, optimizer = parts.head.state_dict(), parts.optimizer.state_dict()
    if parts.head.weight_rows is None:
        return head, optimizer
    ranks, rows = parts.world.ranks, parts.head.num_classes
    index = _optimizer_index(parts.optimizer, parts.head.weight)
    moment = optimizer["state"][index]
    head["weight"] = gather_rows(head["weight"], rows, ranks)
    # A new dict: the optimizer's own state must keep this rank's rows.
    optimizer["state"] = {**optimizer["state"], index: {
        **moment, "momentum_buffer": gather_rows(moment["momentum_buffer"], rows, ranks)}}
    return head, optimizer


def _optimizer_index(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> int:
    """``param``'s key in the optimizer's state_dict (its place over all groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(params) if p is param)


def _whole_image_stats(parts: RunParts) -> ImageStats | None:
    """The per-image sums over every rank's class images (each rank saw other ones)."""
    stats, world = parts.image_stats, parts.world
    if stats is None or world.world_size == 1:
        return stats
    whole = ImageStats(stats.count.numel(), stats.k, str(stats.count.device))
    whole.load_state_dict({name: world.sum(value) for name, value in stats.state_dict().items()})
    return whole


def check_resumable(state: dict[str, Any], *, dataset: dict[str, Any], global_batch: int,
                    world_size: int, batch_size: int, shards: str, ckpt_dir: Path) -> None:
    """A run resumes on the data it started on (a copy elsewhere is fine, as the manifest
    fingerprint travels with it: another dataset would silently mislabel every class), on
    any number of ranks as long as the global batch (hence the sample order, the schedule
    and attfc's container) stays the same."""
    trained_on = state.get("dataset")
    if trained_on is not None and trained_on != dataset:
        raise UserError(f"--resume: {ckpt_dir} was trained on another dataset "
                        f"({trained_on['num_identities']} identities, "
                        f"{trained_on['num_images']} images) than --shards {shards} "
                        f"({dataset['num_identities']}, {dataset['num_images']}, other "
                        "fingerprint); resume with the run's own shards, or train into a "
                        "new --output")
    saved, ranks = state.get("global_batch"), state.get("world_size", 1)
    if saved is None or saved == global_batch:
        return
    hint = (f"pass --batch-size {saved // world_size} to keep it" if saved % world_size == 0
            else f"{saved} does not split over {world_size} ranks; use a number of ranks "
            "that divides it")
    raise UserError(f"--resume: {ckpt_dir} was trained with a global batch of {saved} "
                    f"({saved // ranks} per rank x {ranks}); this run's is {global_batch} "
                    f"(--batch-size {batch_size} x {world_size}): {hint}, or train into a "
                    "new --output")
