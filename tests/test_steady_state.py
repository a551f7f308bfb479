"""A long run holds steady: memory and open files stay flat from epoch to epoch.

Sixteen short epochs of ``python -m train`` on the CPU, watched from outside with psutil as a
user's monitoring would: resident memory of the trainer and of its loader workers, the
trainer's open descriptors and its number of child processes, sampled after each logged
step the watcher sees. Epoch 1 warms up (allocator pools, first checkpoint) and the last
step shuts down; over the steps in between, growth along the median slope of the samples
must stay under the bounds below, which are far under what one leaked loader, batch or
checkpoint buffer per epoch would add up to, while one late or early sample cannot fail it.
Resident memory dips and recovers by up to 58 MiB between steps without leaking (a 40-epoch
run is flat), so the trend takes about 29 samples: over 11 such samples a leak-free run's
trend reached 27 MiB, over 29 at most 3 MiB.
Meanwhile metrics.jsonl is read as a live reader would, and only ever holds whole lines.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time

import psutil
import pytest

from tests.helpers import (
    assert_ok,
    read_metrics,
    run_module,
    start_module,
    tiny_train_args,
    trend_growth,
)

pytestmark = pytest.mark.slow

EPOCHS = 16
STEPS_PER_EPOCH = 2  # 8 identities x 1 image, --batch-size 4 (fc: identity images only)
WATCHED = range(STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH)  # after warm-up, before exit
MIN_SAMPLES = 20
TRAINER_RSS_GROWTH = 24 << 20  # bytes, over the watched steps
WORKER_RSS_GROWTH = 16 << 20  # all loader workers together
FD_GROWTH = 2  # a checkpoint or metrics write may be open at the moment of sampling


def _sample(trainer: psutil.Process) -> dict[str, int]:
    with trainer.oneshot():
        workers = trainer.children(recursive=True)
        return {"trainer_rss": trainer.memory_info().rss,
                "worker_rss": sum(w.memory_info().rss for w in workers),
                "workers": len(workers), "fds": trainer.num_fds()}


def test_memory_and_descriptors_stay_flat_across_epochs(tmp_path):
    shards = tmp_path / "shards"
    assert_ok(run_module("data_engine.shard", "--src", "synthetic", "--identities", "8",
                         "--images-per-identity", "1", "--seed", "0", "--workers", "1",
                         "--out", shards))
    run = tmp_path / "run"
    process = start_module("train", "--shards", shards, "--output", run,
                           *tiny_train_args(workers=2, head="fc", batch_size=4,
                                            epochs=EPOCHS, log_every=1),
                           stdout=subprocess.DEVNULL)
    trainer = psutil.Process(process.pid)
    samples: dict[int, dict[str, int]] = {}
    try:
        while process.poll() is None:
            steps = [r["step"] for r in read_metrics(run)]
            if steps and steps[-1] in WATCHED and steps[-1] not in samples:
                with contextlib.suppress(psutil.NoSuchProcess):
                    samples[steps[-1]] = _sample(trainer)
            time.sleep(0.02)
    finally:
        _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run)] == list(
        range(1, EPOCHS * STEPS_PER_EPOCH + 1))

    report = json.dumps(samples)
    print("samples by step:", report)  # shown with -s, and with the failure
    assert len(samples) >= MIN_SAMPLES, report
    for key, bound in (("trainer_rss", TRAINER_RSS_GROWTH), ("worker_rss", WORKER_RSS_GROWTH),
                       ("fds", FD_GROWTH)):
        growth = trend_growth({step: sample[key] for step, sample in samples.items()})
        assert growth <= bound, (key, growth, report)
    assert {s["workers"] for s in samples.values()} == {2}, report
