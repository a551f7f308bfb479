"""``python -m train`` end to end on real synthetic shards, as a user runs it (subprocess).

Tiny settings keep it fast on a 2-core CPU: 10 identities x 8 images, B=8, a slim mbf
(``--network-args``), D=64. gamma 0.9 lets the class encoder follow the feature encoder
within the few dozen steps a test can afford, so the loss visibly falls.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch

from tests.helpers import (
    TINY_NETWORK_ARGS,
    assert_one_line_error,
    read_metrics,
    start_module,
    tiny_train_args,
    wait_until,
)

pytestmark = pytest.mark.slow

TINY = tiny_train_args(batch_size=8, gamma=0.9)


def _tiny_backbone():
    from model.backbones import get_model

    return get_model("mbf", embedding_size=64, **TINY_NETWORK_ARGS)


def test_train_end_to_end_then_export(run_cli, synthetic_shards, verification_sets, tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "--shards", synthetic_shards, "--output", run, *TINY,
                   "--epochs", "4", "--log-every", "1", "--val", verification_sets,
                   "--val-every", "20", "--tensorboard", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "effective config:" in done.stdout and "batch_size = 8" in done.stdout

    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 41))
    for key in ("epoch", "loss", "lr", "samples_per_s", "images_per_s", "attention_spread",
                "masked_conflicts", "mem_bytes", "nonfinite_total", "spread_cos_mean",
                "spread_cos_median"):
        assert key in records[0], key
    assert records[-1]["epoch"] == 3 and records[0]["lr"] == pytest.approx(0.1)
    first = sum(r["loss"] for r in records[:10]) / 10
    last = sum(r["loss"] for r in records[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    # epoch ends + every 20
    assert [r["step"] for r in read_metrics(run, "val")] == [10, 20, 30, 40]

    backbone = _tiny_backbone()  # insightface key names, loads strictly
    backbone.load_state_dict(torch.load(run / "model.pt", weights_only=True), strict=True)
    assert json.loads((run / "model.json").read_text())["network"] == "mbf"
    assert (run / "best.pt").is_file() and any((run / "tensorboard").iterdir())
    assert "gamma = 0.9" in (run / "config.toml").read_text()
    assert len(list((run / "checkpoints").glob("step-*.pt"))) == 3  # --keep 3

    onnx = tmp_path / "model.onnx"
    done = run_cli("model.export", run / "model.pt", "--onnx", onnx, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "matches PyTorch within" in done.stdout and onnx.stat().st_size > 0


def test_resume_is_exact(run_cli, synthetic_shards, tmp_path):
    """12 steps straight == 5 steps, stop, resume, 7 more (crossing an epoch boundary); the
    resumed part recomputes its activations (--activation-checkpointing), which must not
    change a bit of the weights, momentum or BatchNorm statistics."""
    common = ["--shards", synthetic_shards, *TINY, "--epochs", "2", "--log-every", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for run, steps in ((straight, "12"), (split, "5")):
        done = run_cli("train", *common, "--output", run, "--max-steps", steps, timeout=300)
        assert done.returncode == 0, done.stderr
    done = run_cli("train", "--output", split, "--resume", "--max-steps", "12",
                   "--activation-checkpointing", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "activation_checkpointing = true" in done.stdout

    a = torch.load(straight / "checkpoints" / "step-000000012.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "step-000000012.pt", weights_only=True)
    for part in ("backbone", "head"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert a["position"] == b["position"]
    assert [r["step"] for r in read_metrics(split)] == [4, 5, 8, 12]  # 5: last step of a run


def test_accumulated_resume_is_exact(run_cli, synthetic_shards, tmp_path):
    """--accumulate 4 (attfc, paper order: the no-grad pre-pass path): 6 steps straight ==
    3 steps, stop, resume (the setting read back from RUN/config.toml), 3 more, bit for bit;
    steps, checkpoints and global_batch count optimizer steps of the whole batch."""
    common = ["--shards", synthetic_shards, *TINY, "--log-every", "1", "--accumulate", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for run, steps in ((straight, "6"), (split, "3")):
        done = run_cli("train", *common, "--output", run, "--max-steps", steps, timeout=300)
        assert done.returncode == 0, done.stderr
    assert "each step: 4 micro-batches of 2" in done.stderr
    done = run_cli("train", "--output", split, "--resume", "--max-steps", "6", timeout=300)
    assert done.returncode == 0, done.stderr

    a = torch.load(straight / "checkpoints" / "step-000000006.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "step-000000006.pt", weights_only=True)
    for part in ("backbone", "head"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    assert a["position"] == b["position"] and a["position"]["step_in_epoch"] == 6
    records = read_metrics(split)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {r["global_batch"] for r in records} == {8}
    assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(straight)]


def test_gpu_memory_turns_on_activation_checkpointing(run_cli, synthetic_shards, tmp_path):
    """The planner predicts about 0.36 GiB for this step and 0.30 with checkpointing: with
    --gpu-memory 0.33 training turns it on (config.toml and metrics.jsonl keep the choice);
    with 0.1 nothing fits, not even with --accumulate, and the run stops before it starts,
    in one line."""
    run, refused = tmp_path / "run", tmp_path / "refused"
    common = ["--shards", synthetic_shards, *TINY, "--max-steps", "1"]
    done = run_cli("train", *common, "--output", run, "--gpu-memory", "0.33", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "activation_checkpointing = true" in (run / "config.toml").read_text()
    record, = read_metrics(run)
    assert record["activation_checkpointing"] is True and record["micro_batches"] == 1
    result = run_cli("train", *common, "--output", refused, "--gpu-memory", "0.1", timeout=300)
    assert_one_line_error(result, "--gpu-memory 0.1: no checkpointing or accumulation "
                          "makes the step fit")
    assert not refused.exists()


def test_sigint_checkpoints_and_exits_zero(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    # Own process group, signalled as a whole: what Ctrl-C in a terminal does, so the
    # loader's worker processes get the SIGINT too.
    process = start_module("train", "--shards", synthetic_shards, "--output", run, *TINY,
                           "--epochs", "50", "--log-every", "1", start_new_session=True)
    wait_until(lambda: bool(read_metrics(run)), process, timeout=120)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert f"resume with: python -m train --output {run} --resume" in out
    newest = max((run / "checkpoints").glob("step-*.pt"))
    step = torch.load(newest, weights_only=True)["position"]["step"]
    assert (run / "model.pt").is_file()
    assert f"stopped by SIGINT at step {step};" in out


def test_nonfinite_losses_stop_with_last_good_checkpoint(run_cli, synthetic_shards, tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "--shards", synthetic_shards, "--output", run, *TINY,
                   "--log-every", "1", "--ckpt-every", "3", "--max-nonfinite", "3",
                   "--inject-nan-at-step", "2", "--inject-nan-at-step", "5-99", timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert "3 non-finite losses in a row up to step 7" in lines[-1], done.stderr
    assert "step-000000006.pt" in lines[-1]  # steps 5-6 were skipped: weights still good
    records = read_metrics(run)
    assert [r["nonfinite_total"] for r in records] == [0, 1, 1, 1, 2, 3]
    state = torch.load(run / "checkpoints" / "step-000000006.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["backbone"].values())


@pytest.mark.parametrize("head", ["attfc", "fc", "partialfc"])
def test_a_poisoned_step_is_skipped_without_a_trace(run_cli, synthetic_shards, tmp_path, head):
    """--inject-nan-at-step makes step 2's forward NaN: it is skipped, step 3 trains on, and
    model.pt, the BN statistics and attfc's container in the checkpoint stay finite."""
    run = tmp_path / head
    done = run_cli("train", "--shards", synthetic_shards, "--output", run, *TINY, "--head", head,
                   "--max-steps", "3", "--log-every", "1", "--inject-nan-at-step", "2",
                   timeout=300)
    assert done.returncode == 0, done.stderr
    records = read_metrics(run)
    assert [r["loss"] is not None for r in records] == [True, False, True]
    assert [r["nonfinite_total"] for r in records] == [0, 1, 1]
    model = torch.load(run / "model.pt", weights_only=True)
    state = torch.load(run / "checkpoints" / "step-000000003.pt", weights_only=True)
    tensors = {**model, **{f"{part} {name}": value for part in ("backbone", "head")
                           for name, value in state[part].items()}}
    assert any("dcc.centers" in name for name in tensors) == (head == "attfc")
    bad = [name for name, value in tensors.items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    assert not bad, bad


def test_corrupt_image_stops_with_its_shard_or_is_skipped(run_cli, synthetic_shards, tmp_path):
    """A damaged image: one-line error naming shard and offset; --skip-bad trains on."""
    import shutil

    import numpy as np

    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    index = np.load(shards / "index.npz")
    victim = 17
    shard = shards / json.loads((shards / "manifest.json").read_text())["shards"][
        int(index["image_shard"][victim])]["name"]
    with open(shard, "r+b") as handle:  # same length, no JPEG markers left
        handle.seek(int(index["image_offset"][victim]))
        handle.write(b"\0" * int(index["image_size"][victim]))
    args = ["--shards", shards, *TINY, "--epochs", "1", "--log-every", "5"]

    failed = run_cli("train", "--output", tmp_path / "strict", *args, timeout=300)
    assert failed.returncode == 2, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert shard.name in last and str(int(index["image_offset"][victim])) in last, last
    assert "Traceback" not in failed.stderr

    skipped = run_cli("train", "--output", tmp_path / "lenient", *args, "--skip-bad",
                      timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    # the image is met once as identity image and maybe again as a class image
    assert re.search(r"--skip-bad: [1-9]\d* unreadable images replaced", skipped.stderr)
    assert (tmp_path / "lenient" / "model.pt").is_file()


@pytest.mark.parametrize("head", ["fc", "partialfc"])
def test_baseline_heads_train_from_identity_images_only(run_cli, synthetic_shards, tmp_path, head):
    """fc and Partial FC read no class images (k=0 loader) and still train and export."""
    run = tmp_path / head
    done = run_cli("train", "--shards", synthetic_shards, "--output", run, *TINY,
                   "--head", head, "--max-steps", "3", "--log-every", "1", timeout=300)
    assert done.returncode == 0, done.stderr
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["images_per_s"] == r["samples_per_s"] for r in records)  # 1 image/sample
    assert json.loads((run / "model.json").read_text())["head"] == head
