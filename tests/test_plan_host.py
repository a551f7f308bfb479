"""The planner's host-memory section (train/host_memory.py): every size it predicts against
the arrays and buffers the loading code really allocates, on tiny shards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from data_engine.loading.epoch_plan import EpochPlan
from data_engine.loading.loader import build_loader
from data_engine.loading.reader import ShardReader
from train.config import DEFAULTS
from train.host_memory import IMAGE_BYTES, IMAGES_PER_IDENTITY, host_memory
from train.plan import format_report, plan_report

BATCH, K = 4, 2


def _host(**config) -> dict[str, int]:
    return host_memory({**DEFAULTS, **config}, 10, BATCH * (1 + K))["components"]


def test_index_and_epoch_plan_are_the_readers_and_plans_arrays(synthetic_shards: Path) -> None:
    predicted = _host(shards=str(synthetic_shards), workers=1)
    reader = ShardReader(synthetic_shards)
    held = [reader.identity_start, reader.image_shard, reader.image_offset,
            reader.image_bytes, reader.image_labels]
    assert predicted["shard_index"] == sum(array.nbytes for array in held)
    names = [reader.identity_name(label) for label in range(reader.num_identities)]
    assert predicted["identity_names"] == sum(8 + sys.getsizeof(name) for name in names)
    plan = EpochPlan(reader.identity_start, BATCH, K, seed=0)
    assert np.shares_memory(plan.identity_start, reader.identity_start)  # not counted twice
    assert predicted["epoch_plan"] == plan.order.nbytes + plan.labels.nbytes
    # a worker's JPEG bytes of a step, bounded by shard bytes per image (tar headers included)
    jpegs = predicted["decode_worker_buffers"] - IMAGE_BYTES
    assert BATCH * (1 + K) * reader.image_bytes.mean() < jpegs < BATCH * (1 + K) * (
        reader.image_bytes.mean() + 2048)


def test_loader_slots_are_the_torch_backends_real_ring(synthetic_shards: Path) -> None:
    predicted = _host(shards=str(synthetic_shards), workers=2, backend="torch")
    with build_loader(synthetic_shards, BATCH, K, seed=0, backend="torch", device="cpu",
                      workers=2) as loader:
        next(iter(loader))
        slots = loader._impl._pool.slots
        assert predicted["loader_slots"] == sum(slot.tensor.nbytes for slot in slots)
        assert slots[0].tensor.nbytes == BATCH * (1 + K) * IMAGE_BYTES


def test_without_shards_the_counts_come_from_num_classes_and_are_stated() -> None:
    report = host_memory({**DEFAULTS, "workers": 3}, 1000, BATCH)
    images = 1000 * IMAGES_PER_IDENTITY
    parts = report["components"]
    assert parts["shard_index"] == 1001 * 8 + images * (4 + 8 + 8 + 8)
    assert parts["epoch_plan"] == images * (4 + 4)
    assert parts["loader_slots"] == (3 + 4) * BATCH * IMAGE_BYTES
    assert parts["decode_worker_buffers"] == 3 * IMAGE_BYTES  # JPEG bytes unknown: left out
    assert parts["identity_names"] == 0  # names unknown: left out, and said
    assert "identity_names" in report["notes"][2]
    assert f"{IMAGES_PER_IDENTITY} images per identity (assumed)" in report["notes"][0]


def test_plan_report_has_a_host_section_in_json_and_text(synthetic_shards: Path) -> None:
    config = {**DEFAULTS, "network": "mbf", "network_args": '{"blocks": [1, 1, 1, 1]}',
              "embedding_size": 16, "batch_size": BATCH, "k": K, "head": "attfc",
              "shards": str(synthetic_shards), "workers": 1}
    report = plan_report(config, 10, None)
    host = report["host"]
    assert set(host["components"]) == {"shard_index", "identity_names", "epoch_plan",
                                       "loader_slots", "decode_worker_buffers"}
    assert host["total_gib"] == round(sum(_host(**config).values()) / 2**30, 2)
    text = format_report(report)
    assert "predicted host memory" in text and "loader_slots" in text
    assert f"images: 80 from {synthetic_shards}/manifest.json" in text
