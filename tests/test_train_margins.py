"""``python -m train`` with each margin and each head (tiny CPU runs), and AdaFace's norm
statistics resumed exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.names import HEADS
from tests.helpers import read_metrics
from tests.test_train_cli import TINY

pytestmark = pytest.mark.slow

MARGIN_FLAGS = {"adaface": [], "magface": [],
                "combined": ["--margin-m1", "1.0", "--margin-m2", "0.3", "--margin-m3", "0.2"]}
# What each margin logs beside the loss.
LOGGED = {"adaface": ("feature_norm", "adaface_norm_mean", "adaface_norm_std"),
          "magface": ("feature_norm", "magface_g"), "combined": ()}


def _train(run_cli, shards, run, *args: str):
    done = run_cli("train", "--shards", shards, "--output", run, *TINY,
                   "--epochs", "1", "--log-every", "1", *args, timeout=300)
    assert done.returncode == 0, done.stderr
    return read_metrics(run)


def _check_two_steps(run, records, margin: str) -> None:
    """Two logged steps with a finite loss and the margin's own finite numbers."""
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["loss"])
        for key in LOGGED[margin]:
            assert math.isfinite(record[key]), key
    if margin == "magface":  # the regulariser is part of the loss: ≥ 35·min g = 35·2/110
        assert all(r["loss"] > r["magface_g"] >= 35 * 2 / 110 for r in records)
    assert f'margin = "{margin}"' in (run / "config.toml").read_text()


# Each pair below trains in its own process; adaface with attfc trains in the resume test and
# magface with attfc in the noise report test (the same checks, no third run of it).
@pytest.mark.parametrize(("margin", "head"), [
    (m, h) for m in MARGIN_FLAGS for h in HEADS
    if (m, h) not in {("adaface", "attfc"), ("magface", "attfc")}])
def test_each_margin_trains_with_each_head(run_cli, synthetic_shards, tmp_path, margin,
                                          head):
    records = _train(run_cli, synthetic_shards, tmp_path / "run", "--head", head, "--margin",
                     margin, *MARGIN_FLAGS[margin], "--max-steps", "2")
    _check_two_steps(tmp_path / "run", records, margin)


def test_adaface_statistics_resume_exactly(run_cli, synthetic_shards, tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 more: weights, container and the norm EMA."""
    common = ["--head", "attfc", "--margin", "adaface", "--margin-args", '{"h": 0.5}']
    straight, split = tmp_path / "straight", tmp_path / "split"
    records = _train(run_cli, synthetic_shards, straight, *common, "--max-steps", "4")
    assert records[-1]["adaface_norm_mean"] != pytest.approx(20.0)  # the EMA moved
    _train(run_cli, synthetic_shards, split, *common, "--max-steps", "2")
    done = run_cli("train", "--output", split, "--resume", "--max-steps", "4", timeout=300)
    assert done.returncode == 0, done.stderr
    a = torch.load(straight / "checkpoints" / "step-000000004.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "step-000000004.pt", weights_only=True)
    assert {"margin.norm_mean", "margin.norm_std"} <= set(a["head"])
    for part in ("backbone", "head"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    assert a["position"] == b["position"]


def test_margin_settings_are_checked(run_cli, synthetic_shards, tmp_path):
    done = run_cli("train", "--shards", synthetic_shards, "--output", tmp_path / "run", *TINY,
                   "--margin", "magface", "--margin-args", '{"u_a": 5}', timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("train: error: --margin magface: ")
    done = run_cli("train", "--shards", synthetic_shards, "--output", tmp_path / "run", *TINY,
                   "--margin-args", "[1]", timeout=120)
    assert done.returncode == 2 and "--margin-args [1]: expected a JSON object" in done.stderr


def test_noise_report_adds_the_feature_norm_after_magface(run_cli, tmp_path):
    """An attfc run with MagFace: ``evaluate noise`` adds each photo's feature norm by
    RUN/model.pt as a second score, says so, and ranks the planted truth by it too."""
    import simplejpeg

    from data_engine.loading.reader import ShardReader
    from evaluate.features import embed_batch
    from evaluate.noise import read_image_table
    from model.weights import load_backbone

    shards, run = tmp_path / "shards", tmp_path / "run"
    done = run_cli("data_engine.shard", "--src", "synthetic", "--identities", "8",
                   "--images-per-identity", "4", "--seed", "0", "--mislabeled-share", "0.2",
                   "--out", shards, "--workers", "1")
    assert done.returncode == 0, done.stderr
    records = _train(run_cli, shards, run, "--head", "attfc", "--margin", "magface",
                     "--max-steps", "2")
    _check_two_steps(run, records, "magface")
    done = run_cli("evaluate", "noise", run, "--thumbnails", "2", timeout=300)
    assert done.returncode == 0, done.stderr
    lines = (run / "noise" / "noise.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert {"feature_norm", "norm_rank"} <= set(rows[0])
    ranks = sorted(rows, key=lambda r: int(r["norm_rank"]))
    norms = [float(r["feature_norm"]) for r in ranks]
    assert norms == sorted(norms)  # rank 1: the lowest norm
    backbone = load_backbone(run / "model.pt")  # one photo's norm, computed here
    reader = ShardReader(shards)
    paths = read_image_table(reader).paths
    image_id = paths.index(ranks[0]["path"])
    pixels = simplejpeg.decode_jpeg(reader.read_image(image_id), colorspace="RGB")
    with torch.no_grad():
        feature = embed_batch(backbone, torch.from_numpy(pixels).permute(2, 0, 1)[None],
                              flip=False)
    assert float(feature.norm()) == pytest.approx(norms[0], abs=1e-3)
    summary = json.loads((run / "noise" / "noise.json").read_text())
    assert "magface margin" in summary["second_score_is"]
    assert set(summary["at_k_by_norm"]) == {"mislabeled", "degraded", "either"}
    assert "Second score (columns `feature_norm`, `norm_rank`)" in (
        run / "noise" / "noise.md").read_text()

