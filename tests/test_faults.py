"""The fault matrix: what a days-long run meets, one test per row, real files and processes.

Every row asserts what README.md's "What happens when..." table promises: what was written
before stays valid, the message is one line naming the file, and the exit code.

| fault                                       | test                                              |
|---------------------------------------------|---------------------------------------------------|
| kill -9 while a shard is written            | test_kill9_while_writing_a_shard                  |
| one sharding worker killed (OOM killer)     | test_one_sharding_worker_killed                   |
| disk full while sharding                    | test_disk_full_while_sharding                     |
| read-only output directory                  | test_read_only_output_directory[shard, train]     |
| shard truncated after sharding              | test_truncated_shard_stops_train_before_step_one  |
| shard with a flipped bit                    | test_bit_flipped_shard_found_by_verify_shards     |
| index.npz truncated / bit-flipped           | test_damaged_index                                |
| manifest.json truncated / bit-flipped       | test_damaged_manifest                             |
| kill -9 while a checkpoint is written       | test_kill9_while_writing_a_checkpoint             |
| disk full while a checkpoint is written     | test_disk_full_while_writing_a_checkpoint         |
| checkpoint truncated / bit-flipped          | test_damaged_checkpoints                          |
| SIGTERM during validation                   | test_sigterm_during_validation                    |
| --resume with another dataset / settings    | test_resume_refuses_another_run                   |
| disk full in metrics.jsonl                  | test_disk_full_in_metrics_jsonl                   |
| disk full in TensorBoard                    | test_disk_full_in_tensorboard                     |
| disk full in evaluate's cache / JSON/report | test_disk_full_in_evaluate_writers                |
| kill -9 while evaluate commits its cache    | test_kill9_while_evaluate_commits_its_cache       |
| one non-finite step (skipped, no trace)     | test_train_cli.py: test_a_poisoned_step_is_...    |
| non-finite loss past --max-nonfinite        | test_train_cli.py: test_nonfinite_losses_stop_... |
| damaged image met in training               | test_train_cli.py: test_corrupt_image_stops_...   |
| /dev/shm too small for the loader           | test_dev_shm_too_small_for_the_loader             |
| Ctrl-C while sharding, damaged shard rerun  | test_shard_resume.py (both tests)                 |
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fault_helpers import (
    FREEZE,
    fill_disk,
    killed_by_strace,
    last_error_line,
    resize_disk,
    run_then_kill,
    small_dev_shm_prefix,
    small_disk,
    strace_prefix,
)
from tests.helpers import (
    TINY_NETWORK_ARGS,
    assert_ok,
    read_metrics,
    run_module,
    start_module,
    tiny_train_args,
    tree_bytes,
)
from tests.shard_helpers import output_bytes

# fc: the cheapest head (identity images only); what these rows test does not depend on it.
TINY = tiny_train_args(head="fc", batch_size=8, log_every=1)
# 24 small synthetic people in ~8 shards: enough shards to kill or fill mid-way.
SHARD = ["--src", "synthetic", "--identities", "24", "--images-per-identity", "4", "--seed",
         "2", "--shard-size", "24k", "--workers", "1"]


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory) -> Path:
    """Another dataset (12 ids x 8 images) than the session's synthetic shards."""
    out = tmp_path_factory.mktemp("faults") / "other"
    assert_ok(run_module("data_engine.shard", "--src", "synthetic", "--identities", "12",
                         "--images-per-identity", "8", "--seed", "1", "--workers", "1",
                         "--out", out))
    return out


@pytest.fixture(scope="module")
def trained(synthetic_shards, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 1, 2 and 3 (copy it before changing it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert_ok(run_module("train", "--shards", synthetic_shards, "--output", run, *TINY,
                         "--max-steps", "3", "--ckpt-every", "1", timeout=300))
    return run


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The reference output of SHARD, written without faults."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    assert_ok(run_module("data_engine.shard", *SHARD, "--out", out))
    return out


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x01]))


def _shards_intact(out: Path) -> list[str]:
    """Names of the finished shards, each checked against its sidecar's sha256."""
    from data_engine.layout import sidecar_path
    from data_engine.writing.shardwriter import file_sha256

    names = sorted(p.name for p in out.glob("shard-*.tar"))
    for name in names:
        meta = json.loads(sidecar_path(out, name).read_text())
        assert file_sha256(out / name) == meta["sha256"], name
    return names


# -- sharding -------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill9_while_writing_a_shard(sharded, tmp_path):
    """Killed with shards 0-2 committed and shard 3's temp file open: the three stay intact,
    and the rerun keeps them and ends byte-identical to an uninterrupted run."""
    from data_engine.layout import shard_name, sidecar_path

    out = tmp_path / "shards"
    temp = out / ".shard-000003.tar.tmp"
    committed = [shard_name(i) for i in range(3)]
    # The one worker writes the shards in plan order and freezes at its first write into
    # shard 3, while this job's main process commits shards 0-2 (fsync, rename, sidecar).
    prefix = strace_prefix(temp, "write", tmp_path / "strace.txt", FREEZE)
    run_then_kill(prefix, "data_engine.shard", *SHARD, "--out", out,
                  until=lambda: temp.is_file() and all(
                      sidecar_path(out, name).is_file() for name in committed))
    assert not (out / "manifest.json").exists()
    assert _shards_intact(out) == committed  # what was finished before the kill is intact
    assert not (out / "shard-000003.tar").exists()

    rerun = assert_ok(run_module("data_engine.shard", *SHARD, "--out", out))
    assert "3 already done" in rerun.stderr
    assert output_bytes(out) == output_bytes(sharded)
    assert not list(out.glob(".*"))  # the killed writer's temp file is gone


@pytest.mark.slow
def test_one_sharding_worker_killed(sharded, tmp_path):
    """What the out-of-memory killer does: one of two workers SIGKILLed at its first write to
    shard 5. The job ends by itself with one line naming the worker and the shard (it used
    to wait forever for the lost task); the shards finished before are intact, and the rerun
    completes the folder byte-identical to an uninterrupted run."""
    out = tmp_path / "shards"
    log = tmp_path / "strace.txt"
    prefix = strace_prefix(out / ".shard-000005.tar.tmp", "write", log)
    two_workers = [*SHARD[:-1], "2"]
    assert SHARD[-2] == "--workers"
    result = run_module("data_engine.shard", *two_workers, "--out", out, prefix=prefix, timeout=300)
    assert "killed by SIGKILL" in log.read_text()
    line = last_error_line(result, "data_engine.shard")
    assert re.search(r"sharding worker \d+ was killed by SIGKILL .*while writing "
                     r"shard-000005\.tar; rerun", line), line
    # Shards 0-4 were taken before shard 5, and at most one of them was still in the other
    # worker's hands: at least four were finished, and they are kept.
    assert len(_shards_intact(out)) >= 4
    assert not (out / "manifest.json").exists()

    assert_ok(run_module("data_engine.shard", *two_workers, "--out", out))
    assert output_bytes(out) == output_bytes(sharded)
    assert not list(out.glob(".*"))


@pytest.mark.slow
def test_disk_full_while_sharding(sharded, tmp_path):
    total = sum(p.stat().st_size for p in sharded.iterdir() if p.is_file())
    with small_disk(tmp_path / "disk", total // 2 // 4096 * 4096) as disk:
        out = disk / "shards"
        result = run_module("data_engine.shard", *SHARD, "--out", out)
        line = last_error_line(result, "data_engine.shard")
        assert line.startswith(f"data_engine.shard: error: cannot write {out}/shard-"), line
        for part in ("disk full (No space left on device): needs", "unfinished shards",
                     f"free in {out}", "rerun the same command"):
            assert part in line, line
        finished = _shards_intact(out)
        assert finished and not list(out.glob(".*"))

        resize_disk(disk, 4 * total)  # the user frees space and reruns
        rerun = assert_ok(run_module("data_engine.shard", *SHARD, "--out", out))
        assert f"{len(finished)} already done" in rerun.stderr
        assert output_bytes(out) == output_bytes(sharded)


@pytest.mark.slow
@pytest.mark.parametrize("prog", ["data_engine.shard", "train"])
def test_read_only_output_directory(prog, synthetic_shards, tmp_path):
    with small_disk(tmp_path / "ro", 1 << 20, read_only=True) as disk:
        if prog == "train":
            result = run_module("train", "--shards", synthetic_shards, "--output", disk / "run",
                                *TINY, "--max-steps", "1")
        else:
            result = run_module("data_engine.shard", *SHARD, "--out", disk / "shards")
        line = last_error_line(result, prog)
        assert f"{disk / ('run' if prog == 'train' else 'shards')}" in line, line
        assert "Read-only file system" in line, line


# -- a damaged shards folder ----------------------------------------------------------------

@pytest.mark.slow
def test_truncated_shard_stops_train_before_step_one(synthetic_shards, tmp_path):
    shards = _copy(synthetic_shards, tmp_path / "shards")
    shard = shards / "shard-000000.tar"
    recorded = shard.stat().st_size
    os.truncate(shard, recorded - 10240)  # an interrupted copy
    before = tree_bytes(shards)
    result = run_module("train", "--shards", shards, "--output", tmp_path / "run", *TINY)
    line = last_error_line(result, "train")
    assert f"{shard}: {recorded - 10240} bytes, manifest.json says {recorded}" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first step
    assert tree_bytes(shards) == before


@pytest.mark.slow
def test_dev_shm_too_small_for_the_loader(synthetic_shards, tmp_path):
    """A container's small /dev/shm (here a real 1 MiB tmpfs in a mount namespace of the
    run's own) cannot hold the torch loader's shared batch buffers (5 of 0.3 MiB): train
    stops before step one with one line naming /dev/shm and --workers."""
    prefix = small_dev_shm_prefix(1 << 20)
    result = run_module("train", "--shards", synthetic_shards, "--output", tmp_path / "run", *TINY,
                        "--max-steps", "2", prefix=prefix, timeout=300)
    line = last_error_line(result, "train")
    assert line.startswith("train: error: /dev/shm: no room for the torch loader's 5 batch "
                           "buffers") and "pass fewer --workers" in line, line
    assert not list((tmp_path / "run").glob("checkpoints/*"))


@pytest.mark.slow
def test_bit_flipped_shard_found_by_verify_shards(synthetic_shards, tmp_path):
    from data_engine.loading.reader import ShardReader

    shards = _copy(synthetic_shards, tmp_path / "shards")
    reader = ShardReader(shards)
    _flip_bit(reader.shard_paths[0], int(reader.image_offset[0] + reader.image_bytes[0] // 2))
    recorded = json.loads((shards / "manifest.json").read_text())["shards"][0]["sha256"]
    result = run_module("train", "--shards", shards, "--output", tmp_path / "run", *TINY,
                        "--verify-shards")
    line = last_error_line(result, "train")
    assert f"{reader.shard_paths[0]}: sha256 " in line and f"says {recorded}" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:
        _flip_bit(path, path.stat().st_size // 2)


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_index(synthetic_shards, tmp_path, how):
    """What train runs before step one (size check, then the reader) names index.npz."""
    from common.errors import UserError
    from data_engine.loading.integrity import check_shards
    from data_engine.loading.reader import ShardReader

    shards = _copy(synthetic_shards, tmp_path / "shards")
    _damage(shards / "index.npz", how)
    check_shards(shards)  # the shards themselves are fine
    with pytest.raises(UserError, match=r"index\.npz") as error:
        ShardReader(shards)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_manifest(synthetic_shards, tmp_path, how):
    from common.errors import UserError
    from data_engine.loading.integrity import check_shards

    shards = _copy(synthetic_shards, tmp_path / "shards")
    manifest = shards / "manifest.json"
    first = json.loads(manifest.read_text())["shards"][0]
    if how == "truncated":
        _damage(manifest, how)
        expected = f"{manifest}: unreadable"
    else:  # the last digit of the first shard's recorded size, one bit off
        text = manifest.read_text()
        _flip_bit(manifest, text.index(f'"bytes": {first["bytes"]}') + len(
            f'"bytes": {first["bytes"]}') - 1)
        flipped = json.loads(manifest.read_text())["shards"][0]["bytes"]
        expected = (f"{shards / first['name']}: {first['bytes']} bytes, manifest.json says "
                    f"{flipped}")
    with pytest.raises(UserError) as error:
        check_shards(shards)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


# -- training -------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill9_while_writing_a_checkpoint(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "strace.txt"
    temp = run / "checkpoints" / ".step-000000006.pt.tmp"
    prefix = strace_prefix(temp, "fsync", log)  # written in full, not yet renamed
    run_then_kill(prefix, "train", "--shards", synthetic_shards, "--output", run, *TINY,
                  "--max-steps", "6", "--ckpt-every", "3", until=killed_by_strace(log))
    from train.checkpoint import list_checkpoints, load_checkpoint

    assert temp.stat().st_size > 0  # killed inside step 6's checkpoint write
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000000003.pt"]
    assert load_checkpoint(run / "checkpoints" / "step-000000003.pt")["position"]["step"] == 3
    assert [r["step"] for r in read_metrics(run, None)] == [1, 2, 3, 4, 5, 6]

    resumed = assert_ok(run_module("train", "--output", run, "--resume", timeout=300))
    assert f"resuming from {run / 'checkpoints' / 'step-000000003.pt'}" in resumed.stderr
    assert [r["step"] for r in read_metrics(run, None)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000000003.pt", "step-000000006.pt"]  # the temp file was replaced


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint(synthetic_shards, trained, tmp_path):
    size = (trained / "checkpoints" / "step-000000001.pt").stat().st_size
    with small_disk(tmp_path / "disk", size * 3 // 2 // 4096 * 4096) as disk:
        run = disk / "run"
        ckpts = run / "checkpoints"
        result = run_module("train", "--shards", synthetic_shards, "--output", run, *TINY,
                            "--max-steps", "4", "--ckpt-every", "2", timeout=300)
        line = last_error_line(result, "train")
        assert line.startswith(f"train: error: cannot write {ckpts / 'step-000000004.pt'}: "
                               "disk full (No space left on device): needs "), line
        assert f"free in {ckpts}; last good checkpoint {ckpts / 'step-000000002.pt'}; " \
               f"free space, then resume with: python -m train --output {run} --resume" in line
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-000000002.pt"]

        resize_disk(disk, size * 4)
        assert_ok(run_module("train", "--output", run, "--resume", timeout=300))
        assert [r["step"] for r in read_metrics(run, None)] == [1, 2, 3, 4]
        assert (ckpts / "step-000000004.pt").is_file()


@pytest.mark.slow
def test_damaged_checkpoints(trained, tmp_path):
    """Newest truncated, next bit-flipped: resume from the oldest; all damaged: refused."""
    run = _copy(trained, tmp_path / "run")
    ckpts = run / "checkpoints"
    _damage(ckpts / "step-000000003.pt", "truncated")
    _damage(ckpts / "step-000000002.pt", "bit-flipped")
    resumed = assert_ok(run_module("train", "--output", run, "--resume", timeout=300))
    for step in (3, 2):
        assert f"skipping unreadable checkpoint {ckpts / f'step-00000000{step}.pt'}" \
            in resumed.stderr
    assert f"resuming from {ckpts / 'step-000000001.pt'}" in resumed.stderr

    broken = _copy(trained, tmp_path / "broken")
    for path in (broken / "checkpoints").iterdir():
        _damage(path, "truncated")
    before = tree_bytes(broken)
    result = run_module("train", "--output", broken, "--resume", timeout=300)
    line = last_error_line(result, "train")
    assert line == f"train: error: --resume: no readable checkpoint in {broken / 'checkpoints'}"
    assert tree_bytes(broken) == before


@pytest.mark.slow
def test_sigterm_during_validation(synthetic_shards, verification_sets, tmp_path):
    """SIGTERM as validation starts (strace sends it at step 3's record): validation
    finishes and is recorded, the run stops at the next step boundary with a checkpoint,
    exit 0."""
    run = tmp_path / "run"
    prefix = strace_prefix(run / "metrics.jsonl", "write", tmp_path / "strace.txt",
                           "signal=SIGTERM", when="3")
    process = start_module("train", "--shards", synthetic_shards, "--output", run, *TINY,
                           "--val", verification_sets, "--val-every", "3", "--max-steps", "8",
                           prefix=prefix)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    assert err.index("SIGTERM received") < err.index("validation: synth")  # it was running
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+); resume with: python -m "
                            rf"train --output {re.escape(str(run))} --resume", out)[1])
    assert stopped in (3, 4)  # this step, or the next one all ranks agree on
    records = [(r["step"], r.get("kind")) for r in read_metrics(run, None)]
    assert records == [(1, None), (2, None), (3, None), (3, "val"), (4, None)][:stopped + 1]
    from train.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / f"step-{stopped:09d}.pt")
    assert state["position"]["step"] == stopped


@pytest.mark.slow
@pytest.mark.parametrize("change", ["dataset", "settings"])
def test_resume_refuses_another_run(other_shards, trained, tmp_path, change):
    run = _copy(trained, tmp_path / "run")
    before = tree_bytes(run)
    if change == "dataset":
        result = run_module("train", "--output", run, "--resume", "--shards",
                            other_shards, timeout=300)
        expected = (f"train: error: --resume: {run / 'checkpoints'} was trained on another "
                    f"dataset (10 identities, 80 images) than --shards {other_shards}")
    else:
        result = run_module("train", "--output", run, "--resume", "--embedding-size", "128",
                            "--lr", "0.05")
        expected = (f"train: error: --resume: {run / 'config.toml'} was trained with other "
                    "settings (--embedding-size 64 -> 128; --lr 0.1 -> 0.05)")
    assert last_error_line(result, "train").startswith(expected)
    assert tree_bytes(run) == before


def test_disk_full_in_metrics_jsonl(tmp_path):
    """A full disk mid-record: the file keeps whole lines only, and takes more once freed."""
    from common.files import WriteError
    from train.metrics import MetricsLog

    with small_disk(tmp_path / "disk", 64 << 10) as disk:
        run = disk / "run"
        run.mkdir()
        log = MetricsLog(run, tensorboard=False)
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 1.0})
        before = (run / "metrics.jsonl").read_bytes()
        filler = fill_disk(disk)
        with pytest.raises(WriteError) as error:
            for step in range(4, 10_000):
                log.write({"step": step, "loss": 1.0, "note": "x" * 300})
        assert str(error.value).startswith(f"cannot write {run / 'metrics.jsonl'}: disk full")
        text = (run / "metrics.jsonl").read_bytes()
        assert text.startswith(before) and text.endswith(b"\n")
        steps = [json.loads(line)["step"] for line in text.splitlines()]
        assert steps == list(range(1, len(steps) + 1))

        filler.unlink()
        log.write({"step": len(steps) + 1, "loss": 1.0})
        log.close()
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_bytes()
                .splitlines()] == list(range(1, len(steps) + 2))


def test_disk_full_in_tensorboard(tmp_path, capfd):
    from common.files import WriteError
    from train.metrics import MetricsLog

    run = tmp_path / "run"
    run.mkdir()
    with small_disk(run / "tensorboard", 64 << 10) as board:
        log = MetricsLog(run, tensorboard=True)
        log.write({"step": 1, "loss": 1.0})
        fill_disk(board)
        with pytest.raises(WriteError) as error:
            for step in range(2, 100_000):
                log.write({"step": step, "loss": 1.0, "lr": 0.1, "other": 2.0})
        log.close()
        assert str(error.value).startswith(f"cannot write {board}: disk full"), error.value
        steps = [r["step"] for r in read_metrics(run, None)]
        assert steps == list(range(1, len(steps) + 1))  # metrics.jsonl is whole and complete
        assert "Traceback" not in capfd.readouterr().err  # the writer thread stays quiet


def test_disk_full_in_evaluate_writers(tmp_path):
    """The feature cache keeps its old features and key; JSON and report files are not
    left half-written."""
    from common.files import WriteError
    from evaluate.__main__ import _write_json
    from evaluate.features import cached_features
    from evaluate.report import write_report

    old = np.arange(64 * 100, dtype=np.float32).reshape(100, 64)
    with small_disk(tmp_path / "disk", 256 << 10) as disk:
        cache = disk / "features.npy"
        cached_features(cache, {"model": "a"}, lambda: old)
        run = disk / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "epoch": 0, "loss": 5.0 - s, "lr": 0.1}) + "\n"
            for s in range(1, 5)))
        kept = tree_bytes(disk)
        fill_disk(disk)
        with pytest.raises(WriteError, match=f"cannot write {cache}.new: disk full"):
            cached_features(cache, {"model": "b"}, lambda: old + 1)
        with pytest.raises(WriteError, match=f"cannot write {disk / 'ijbc.json'}: disk full"):
            _write_json(disk / "ijbc.json", {"top1": 0.5})
        with pytest.raises(WriteError, match=f"cannot write {run / 'report'}/.*: disk full"):
            write_report(run)
        (disk / "filler").unlink()
        assert {k: v for k, v in tree_bytes(disk).items() if not k.startswith("run/report")} \
            == kept
        assert not list((run / "report").iterdir())
        reused = cached_features(cache, {"model": "a"}, lambda: pytest.fail("recomputed"))
        assert np.array_equal(reused, old)


@pytest.fixture(scope="module")
def ijb_and_models(synth_ijb, tmp_path_factory):
    """The tiny synthetic IJB-C and two different tiny models."""
    from model.backbones import get_model

    root = tmp_path_factory.mktemp("models")
    models = []
    for seed in (0, 1):
        folder = root / f"model{seed}"
        folder.mkdir()
        torch.manual_seed(seed)
        net = get_model("mbf", embedding_size=64, **TINY_NETWORK_ARGS)
        torch.save(net.state_dict(), folder / "model.pt")
        (folder / "model.json").write_text(json.dumps(
            {"network": "mbf", "embedding_size": 64, "network_args": TINY_NETWORK_ARGS}))
        models.append(folder / "model.pt")
    return synth_ijb, models


@pytest.mark.slow
def test_kill9_while_evaluate_commits_its_cache(ijb_and_models, tmp_path):
    """Killed after model B's features replaced model A's but before their key was written:
    a run with model A must not take B's features for its own."""
    root, (model_a, model_b) = ijb_and_models
    cache = tmp_path / "cache" / "features.npy"

    def evaluate(model: Path, out: Path, prefix: list[str] | None = None):
        args = ["ijbc", "--root", root, "--model", model, "--device", "cpu", "--batch-size",
                "16", "--cache", cache, "--out", out]
        if prefix is None:
            return assert_ok(run_module("evaluate", *args, timeout=300))
        return run_then_kill(prefix, "evaluate", *args,
                             until=killed_by_strace(tmp_path / "strace.txt"))

    first = evaluate(model_a, tmp_path / "a.json")
    assert "cached features in" in first.stderr
    sidecar_temp = cache.parent / ".features.json.tmp"
    evaluate(model_b, tmp_path / "b.json",
             strace_prefix(sidecar_temp, "fsync", tmp_path / "strace.txt"))
    assert not cache.with_suffix(".json").exists() and not (tmp_path / "b.json").exists()

    again = evaluate(model_a, tmp_path / "a2.json")
    assert "using cached features" not in again.stderr
    assert (tmp_path / "a2.json").read_bytes() == (tmp_path / "a.json").read_bytes()
