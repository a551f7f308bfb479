"""Host memory of a run's data path, for ``--plan``: the shard index and identity names, the
epoch plan and the torch loader's batch buffers, sized as the loading code allocates them.

The index and plan arrays scale with the image count, which comes from the shards'
manifest.json, or, planning before sharding, from ``--num-classes`` times an assumed
images-per-identity that the report states. Forked decode workers share the parent's index
pages (numpy buffers are never written, so copy-on-write never copies them). DALI allocates
its pinned buffers inside its own pipeline, so they are not predicted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from data_engine.layout import IDENTITIES, read_manifest
from data_engine.loading.loader import default_workers, slot_count

# MS1MV3's mean (5,179,510 images of 93,431 identities), assumed when no shards are named.
IMAGES_PER_IDENTITY = 55
IMAGE_BYTES = 3 * 112 * 112  # one uint8 RGB image as the loader ships it
# ShardReader's arrays as the shard writer stores them (plus the reader's own label array):
# per identity, identity_start; per image, shard, offset, JPEG length and label.
_INDEX_PER_IDENTITY = np.dtype(np.int64).itemsize
_INDEX_PER_IMAGE = sum(np.dtype(t).itemsize for t in (np.int32, np.int64, np.int64, np.int64))


def _id_itemsize(count: int) -> int:
    """EpochPlan's rule for its id and label arrays: int32 while the values fit."""
    return 4 if count < 2**31 else 8


class Dataset(NamedTuple):
    identities: int
    images: int
    bytes_per_image: float | None  # shard bytes per image (JPEG plus its tar header)
    name_chars: int | None  # characters of all identity names (identities.txt less newlines)
    counted_from: str


def dataset_size(config: dict[str, Any], num_classes: int) -> Dataset:
    """The counts the arrays scale with: the shards' manifest, else ``--num-classes``."""
    shards = config.get("shards")
    if shards and Path(shards, "manifest.json").exists():
        manifest = read_manifest(Path(shards))
        images = int(manifest["num_images"])
        stored = sum(int(shard["bytes"]) for shard in manifest["shards"])
        identities = int(manifest["num_identities"])
        chars = Path(shards, IDENTITIES).stat().st_size - identities
        return Dataset(identities, images, stored / max(images, 1), chars,
                       f"{shards}/manifest.json")
    return Dataset(num_classes, num_classes * IMAGES_PER_IDENTITY, None, None,
                   f"--num-classes x {IMAGES_PER_IDENTITY} images per identity (assumed)")


def host_memory(config: dict[str, Any], num_classes: int, images_per_step: int
                ) -> dict[str, Any]:
    """Bytes per component of the host memory the data path holds, and their sources.

    ``images_per_step``: images one loader batch decodes, (1 + k)·B, or B for a head that
    needs no class images."""
    data = dataset_size(config, num_classes)
    workers = config["workers"] or default_workers()
    # a worker holds one step's JPEG bytes (read before decoding) and one image of scratch
    jpegs = images_per_step * data.bytes_per_image if data.bytes_per_image else 0
    components = {
        "shard_index": ((data.identities + 1) * _INDEX_PER_IDENTITY
                        + data.images * _INDEX_PER_IMAGE),
        # the reader's list of names: a pointer and a str object each (exact for ASCII)
        "identity_names": (data.identities * (8 + sys.getsizeof("")) + data.name_chars
                           if data.name_chars is not None else 0),
        # the order and labels; identity_start is the reader's array, not a copy
        "epoch_plan": data.images * (_id_itemsize(data.images)
                                     + _id_itemsize(data.identities)),
        "loader_slots": slot_count(workers) * images_per_step * IMAGE_BYTES,
        "decode_worker_buffers": int(workers * (IMAGE_BYTES + jpegs)),
    }
    notes = [f"images: {data.images:,} from {data.counted_from}",
             f"loader_slots: torch backend, {slot_count(workers)} shared-memory batch buffers "
             f"(pinned on CUDA) for {workers} decode workers"
             + ("" if config["workers"] else " (this machine's default --workers)")]
    if data.bytes_per_image is None:
        notes.append("identity_names, decode_worker_buffers: without shards, the names' and a "
                     "step's JPEG bytes are unknown and left out")
    if config["backend"] != "torch":
        notes.append("the DALI backend's pinned buffers are DALI's own and not predicted")
    return {"components": components, "notes": notes}
