"""A long run holds steady: memory and open files stay flat from epoch to epoch.

Seven short epochs of ``python -m train`` on the CPU, watched from outside with psutil as a
user's monitoring would: resident memory of the trainer and of its loader workers, the
trainer's open descriptors and its number of child processes, sampled once per epoch at the
same point (the epoch's second step). Epoch 1 warms up (allocator pools, first checkpoint);
from epoch 2 to the last, growth must stay under the bounds below, which are far under what
one leaked loader, batch or checkpoint buffer per epoch would add up to.
Meanwhile metrics.jsonl is read as a live reader would, and only ever holds whole lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO, run_module

pytestmark = pytest.mark.slow

EPOCHS = 7
STEPS_PER_EPOCH = 2  # 8 identities x 1 image, --batch-size 4 (fc: identity images only)
TRAINER_RSS_GROWTH = 24 << 20  # bytes, epoch 2 -> last
WORKER_RSS_GROWTH = 16 << 20  # all loader workers together
FD_GROWTH = 2  # a checkpoint or metrics write may be open at the moment of sampling


def _whole_lines(path) -> list[dict]:
    text = path.read_text() if path.is_file() else ""
    assert not text or text.endswith("\n"), f"torn last line: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines()]


def test_memory_and_descriptors_stay_flat_across_epochs(tmp_path):
    shards = tmp_path / "shards"
    done = run_module("data_engine.shard", "--src", "synthetic", "--identities", "8",
                      "--images-per-identity", "1", "--seed", "0", "--workers", "1",
                      "--out", shards, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    command = [sys.executable, "-m", "train", "--shards", str(shards), "--output", str(run),
               "--network", "mbf", "--network-args", '{"blocks": [1, 1, 1, 1], "scale": 1}',
               "--embedding-size", "64", "--head", "fc", "--batch-size", "4",
               "--device", "cpu",
               "--backend", "torch", "--workers", "2", "--no-tensorboard", "--val", "none",
               "--epochs", str(EPOCHS), "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # 2 busy cores
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    trainer = psutil.Process(process.pid)
    samples: dict[int, dict[str, int]] = {}
    deadline = time.monotonic() + 400
    try:
        while len(samples) < EPOCHS:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, samples
            steps = [r["step"] for r in _whole_lines(run / "metrics.jsonl")]
            epoch = (steps[-1] - 2) // STEPS_PER_EPOCH if steps else -1
            if steps and (steps[-1] - 2) % STEPS_PER_EPOCH == 0 and epoch not in samples:
                with trainer.oneshot():
                    workers = trainer.children(recursive=True)
                    samples[epoch] = {
                        "trainer_rss": trainer.memory_info().rss,
                        "worker_rss": sum(w.memory_info().rss for w in workers),
                        "workers": len(workers),
                        "fds": trainer.num_fds(),
                    }
            time.sleep(0.02)
    finally:
        _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert [r["step"] for r in _whole_lines(run / "metrics.jsonl")] == list(
        range(1, EPOCHS * STEPS_PER_EPOCH + 1))

    second, last = samples[1], samples[EPOCHS - 1]
    report = json.dumps(samples)
    print("per-epoch samples:", report)  # shown with -s, and with the failure
    assert last["trainer_rss"] - second["trainer_rss"] < TRAINER_RSS_GROWTH, report
    assert last["worker_rss"] - second["worker_rss"] < WORKER_RSS_GROWTH, report
    assert last["fds"] - second["fds"] <= FD_GROWTH, report
    assert last["workers"] == second["workers"] > 0, report
