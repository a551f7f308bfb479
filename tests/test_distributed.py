"""``torchrun -m train`` on two CPU ranks (gloo) against one process with the same global batch.

Real torchrun launches on real synthetic shards. Two ranks with --batch-size 4 must train
what one process with --batch-size 8 trains: the same losses, the same final weights (and
attfc container), a SIGTERM'd two-rank run resumed on one process lands on the straight
two-rank run, and a rank killed mid-run makes the other stop with an error.

The networks have BatchNorm, so the two-rank runs use --sync-bn. They start from a briefly
trained feature encoder (--init): at random initialisation the synthetic faces map to nearly
one point, and BN over so narrow a batch turns float32 rounding into gradient differences of
~1e-3 between two *one-process* runs that merely use another thread count. From the warm
start the one-process runs agree with each other, and the two-rank runs with them, to ~1e-6.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fault_helpers import strace_prefix
from tests.helpers import (
    REPO,
    assert_ok,
    module_env,
    read_metrics,
    run_module,
    tiny_train_args,
    wait_until,
)

pytestmark = pytest.mark.slow

TOL = 1e-5
# Momentum buffers are (sums of) gradients, whose float32 rounding noise on this tiny BN
# network is 1e-4 (fc) to 1e-3 (attfc) relative even between two one-process runs on 1 and
# 2 threads; the weights they move are held to TOL.
MOMENTUM_TOL = 1e-2
TINY = tiny_train_args(embedding_size=16, workers=0, gamma=0.9, prefetch=0, log_every=1,
                       lr=0.001)
# Each rank on one thread: two ranks on a 2-core machine, and one process alike.
ENV = module_env()
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
            "--nproc_per_node", "2", "-m", "train"]


@pytest.fixture(scope="module")
def warm(synthetic_shards, tmp_path_factory):
    """A feature encoder trained for a few steps (its model.pt)."""
    run = tmp_path_factory.mktemp("dist") / "warm"
    assert_ok(run_module("train", "--shards", synthetic_shards, "--output", run, *TINY,
                         "--head", "fc", "--batch-size", "8", "--lr", "0.1", "--max-steps", "8",
                         timeout=300))
    return run / "model.pt"


def _train(shards: Path, warm: Path, run: Path, *args: str,
           ranks: int = 1, sync_bn: bool = True) -> subprocess.CompletedProcess:
    batch = str(8 // ranks)
    cmd = (TORCHRUN if ranks == 2 else [sys.executable, "-m", "train"]) + [
        "--shards", str(shards), "--output", str(run), *TINY, "--init", str(warm),
        "--batch-size", batch, *args]
    if ranks == 2 and sync_bn:
        cmd.append("--sync-bn")
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def _checkpoint(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step-{step:09d}.pt", weights_only=True)


BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def assert_same_training(one: Path, other: Path, step: int, from_step: int = 0, *,
                         bn_statistics: bool = True) -> None:
    """Losses of every logged step after ``from_step`` within TOL (relative), and the whole
    model at ``step`` (backbone, head: fc matrix or attfc container and class encoder)
    within TOL in relative norm, the momentum buffers within MOMENTUM_TOL; integer state
    (container labels and pointer) equal. ``bn_statistics=False`` leaves out BatchNorm's
    running statistics (and attfc's class encoder's, their copy)."""
    a, b = _losses(one), _losses(other)
    steps = [s for s in a if s > from_step]
    assert steps == [s for s in b if s > from_step] and steps[-1] == step
    for s in steps:
        assert abs(a[s] - b[s]) <= TOL * abs(a[s]), (s, a[s], b[s])
    ca, cb = _checkpoint(one, step), _checkpoint(other, step)
    assert ca["position"] == cb["position"]
    floats_a, floats_b = [], []
    for part in ("backbone", "head"):
        assert ca[part].keys() == cb[part].keys()
        for key, value in ca[part].items():
            if not bn_statistics and key.endswith(BN_STATISTICS):
                continue
            assert value.shape == cb[part][key].shape, key
            if value.is_floating_point():
                floats_a.append(value.double().flatten())
                floats_b.append(cb[part][key].double().flatten())
            else:
                assert torch.equal(value, cb[part][key]), f"{part}.{key}"
    assert _relative(floats_a, floats_b) <= TOL
    moments = [[s["momentum_buffer"] for s in c["optimizer"]["state"].values()]
               for c in (ca, cb)]
    assert _relative(*moments) <= MOMENTUM_TOL


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all the tensors together."""
    whole_a = torch.cat([t.double().flatten() for t in a])
    whole_b = torch.cat([t.double().flatten() for t in b])
    return float((whole_a - whole_b).norm() / whole_b.norm())


@pytest.mark.parametrize(("head", "margin"), [("fc", "arcface"), ("partialfc", "arcface"),
                                            ("partialfc", "adaface"), ("fc", "magface")])
def test_two_ranks_train_what_one_process_trains(synthetic_shards, warm, tmp_path, head, margin):
    """Model-parallel fc / partialfc: the class matrix split over 2 ranks, gathered into one
    checkpoint of the same shape as one process's. AdaFace: the norm statistics of the
    global batch (the same EMA as one process); MagFace: the margin's and the regulariser's
    gradient through every rank's feature norms."""
    one, two = tmp_path / "one", tmp_path / "two"
    _train(synthetic_shards, warm, one, "--head", head, "--margin", margin, "--max-steps", "3")
    done = _train(synthetic_shards, warm, two, "--head", head, "--margin", margin,
                  "--max-steps", "3", "--check-replicas", ranks=2)
    assert "global batch 8" in done.stderr
    assert_same_training(one, two, 3)
    assert _checkpoint(two, 3)["head"]["weight"].shape == (10, 16)  # the whole matrix
    assert json.loads((two / "metrics.jsonl").read_text().splitlines()[0])["global_batch"] == 8


def test_attfc_two_ranks_exact_sigterm_and_resume_on_one(synthetic_shards, warm, tmp_path):
    """attfc on 2 ranks == 1 process (identical containers checked after every step); a
    2-rank run stopped by SIGTERM (to rank 0, as it writes step 1's record: the ranks agree
    to stop together) and resumed on 1 process reproduces the straight 2-rank run."""
    one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"
    args = ["--head", "attfc", "--max-steps", "4"]
    _train(synthetic_shards, warm, one, *args)
    _train(synthetic_shards, warm, two, *args, "--check-replicas", ranks=2)
    assert_same_training(one, two, 4)

    cmd = [*TORCHRUN, "--shards", str(synthetic_shards), "--output", str(split), *TINY,
           "--init", str(warm), "--batch-size", "4", "--sync-bn", *args]
    prefix = strace_prefix(split / "metrics.jsonl", "write", tmp_path / "strace.txt",
                           "signal=SIGTERM", when="1")
    done = subprocess.run([*prefix, *cmd], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    stopped = max(_losses(split))
    assert done.returncode == 0 and stopped in (1, 2), done.stderr[-2000:]
    assert [p.name for p in (split / "checkpoints").iterdir()] == [f"step-{stopped:09d}.pt"]

    refused = run_module("train", "--output", split, "--resume", timeout=300)
    assert refused.returncode == 2
    assert "global batch of 8 (4 per rank x 2)" in refused.stderr
    assert "pass --batch-size 8" in refused.stderr
    assert_ok(run_module("train", "--output", split, "--resume", "--batch-size", "8", timeout=300))
    assert_same_training(two, split, 4, from_step=stopped)


@pytest.mark.parametrize("head", ["attfc", "partialfc"])
def test_two_ranks_accumulating_train_what_one_process_trains(synthetic_shards, warm, tmp_path,
                                                              head):
    """--accumulate: 2 ranks x --batch-size 8 in 2 micro-batches each == one process with
    --batch-size 16 in 4: the same micro-batches of 4 rows, so without --sync-bn BatchNorm
    normalises the same groups; attfc (paper order) pushes the global batch once per step,
    Partial FC samples once from the global batch's labels. Each rank's BN running
    statistics follow its own micro-batches only, so they are left out of the comparison."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--head", head, "--max-steps", "3"]
    _train(synthetic_shards, warm, one, *args, "--batch-size", "16", "--accumulate", "4")
    done = _train(synthetic_shards, warm, two, *args, "--batch-size", "8", "--accumulate", "2",
                  "--check-replicas", ranks=2, sync_bn=False)
    assert "each step: 2 micro-batches of 4" in done.stderr
    assert_same_training(one, two, 3, bn_statistics=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_killed_rank_stops_the_other_within_the_timeout(synthetic_shards, tmp_path):
    """Two ranks started as torchrun starts them (its environment), rank 1 killed mid-run:
    rank 0 exits non-zero with one line naming the failed collective, not a hang."""
    run, timeout = tmp_path / "run", 20
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "train", "--shards", str(synthetic_shards), "--output",
               str(run), *TINY, "--head", "fc", "--batch-size", "4", "--epochs", "50",
               "--dist-timeout", str(timeout)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    wait_until(lambda: bool(read_metrics(run, None)), *procs)
    procs[1].kill()
    killed_at = time.monotonic()
    _, stderr = procs[0].communicate(timeout=timeout + 60)
    procs[1].communicate()
    assert procs[0].returncode == 2, stderr[-2000:]
    assert time.monotonic() - killed_at < timeout + 30
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: rank 0: a collective with the other ranks failed")
    assert "--dist-timeout 20 s" in last and "--resume" in last


def test_epoch_plan_ranks_slice_the_global_batch():
    """Rank r of G reads rows [r·B, (r+1)·B) of the plan one process with G·B draws."""
    from data_engine.loading.epoch_plan import EpochPlan

    starts = np.cumsum([0, 3, 5, 2, 7, 1, 4, 6, 2, 9])
    whole = EpochPlan(starts, 6, 2, seed=3, epoch=1)
    parts = [EpochPlan(starts, 2, 2, seed=3, epoch=1, rank=r, world_size=3) for r in range(3)]
    assert len(whole) == len(parts[0]) == 39 // 6
    for step in range(len(whole)):
        mine = [part.step(step) for part in parts]
        for field in ("image_ids", "class_image_ids", "labels", "flips"):
            assert np.array_equal(getattr(whole.step(step), field),
                                  np.concatenate([getattr(m, field) for m in mine])), field
    with pytest.raises(ValueError, match="drop_last"):
        EpochPlan(starts, 2, 2, seed=3, rank=0, world_size=2, drop_last=False)


def test_class_ranges_cover_every_class_once():
    from model.heads.collective import class_range

    assert [class_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    for n, g in ((7, 7), (1000, 8), (13, 5)):
        ranges = [class_range(n, r, g) for r in range(g)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_replica_digest_sees_one_changed_element():
    """--check-replicas compares fingerprints: equal tensors agree, one ulp or a swap does not."""
    from train.distributed import digest

    x = torch.randn(1000)
    assert torch.equal(digest(x), digest(x.clone()))
    bumped = x.clone()
    bumped[417] = torch.nextafter(bumped[417], torch.tensor(float("inf")))
    swapped = x.clone()
    swapped[[3, 4]] = x[[4, 3]]
    assert not torch.equal(digest(x), digest(bumped))
    assert not torch.equal(digest(x), digest(swapped))
    labels = torch.arange(50)
    assert not torch.equal(digest(labels), digest(labels.flip(0)))
