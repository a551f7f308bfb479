"""``python -m evaluate duplicates``: the robust cut, faiss neighbours, exact and resumable
identity centres, and planted duplicate names and benchmark people found on real shards by
a really trained encoder, then merged and excluded by the sharder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from data_engine import build_loader
from data_engine.loading.reader import ShardReader
from evaluate import knn
from evaluate.centres import identity_centres
from evaluate.duplicates import Cut, duplicate_pairs, neighbours, pair_truth, robust_cut
from evaluate.features import load_embedder
from model.export import export_onnx
from model.heads import build_head
from model.margins import build_margin
from tests.helpers import assert_one_line_error
from train.step import TrainStep, make_optimizer


def test_cut_is_a_robust_z_score_of_closeness():
    # closeness -log(1 - cos) = ln2 x [0, 1, 2, 3, 4]: median 2 ln2, MAD ln2
    cosines = np.array([0.0, 0.5, 0.75, 0.875, 0.9375])
    cut = robust_cut(cosines, z=1.0)
    assert cut.median == pytest.approx(2 * math.log(2))
    assert cut.scale == pytest.approx(1.4826 * math.log(2))
    assert cut.threshold == pytest.approx(1 - 2 ** -(2 + 1.4826))
    assert cut.zscore(0.9375) == pytest.approx(2 / 1.4826)
    # a narrow cone: every distance 1 - cos ten times smaller, the same z-scores
    narrow = robust_cut(1 - (1 - cosines) / 10, z=1.0)
    assert narrow.zscore(1 - 0.0625 / 10) == pytest.approx(2 / 1.4826)
    assert robust_cut(cosines, threshold=0.3).threshold == 0.3


def test_neighbours_leave_out_the_identity_itself_and_pairs_are_listed_once():
    angles = np.array([0.0, 0.05, 1.5, 3.0])
    unit = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    scores, ids, kind = neighbours(unit, 2, gpu=None)
    assert kind == "flat" and ids[:, 0].tolist() == [1, 0, 1, 2]
    assert scores[0, 0] == pytest.approx(math.cos(0.05), abs=1e-6)
    cut = Cut(threshold=0.99, median=0.0, scale=1.0, z=None)
    assert duplicate_pairs(scores, ids, cut) == [(0, 1, pytest.approx(math.cos(0.05), abs=1e-6))]


def test_pair_truth_counts_same_person_pairs():
    people = ["x", "x", "y", "z", "z", "z"]  # planted: 1 + 3 pairs of 15
    truth = pair_truth([(0, 1, 0.9), (0, 2, 0.8), (3, 4, 0.7)], people)
    assert (truth["found"], truth["planted"]) == (2, 4)
    assert truth["precision"] == pytest.approx(2 / 3) and truth["recall"] == 0.5
    assert truth["chance"] == pytest.approx(4 / 15)


def test_hnsw_past_the_flat_size_finds_what_exact_search_finds(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    vectors = centres[rng.integers(40, size=3000)] + 0.3 * rng.normal(size=(3000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    _, exact, kind = knn.search(vectors, vectors[:300], 10)
    assert kind == "flat"
    monkeypatch.setattr(knn, "FLAT_MAX", 1000)
    _, approximate, kind = knn.search(vectors, vectors[:300], 10)
    assert kind == "hnsw"
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall >= 0.95


def _encoder() -> nn.Module:
    return nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 64), nn.BatchNorm1d(64))


def _shard(run_cli, out, *extra, identities="40", images="8"):
    done = run_cli("data_engine.shard", "--src", "synthetic", "--identities", identities,
                   "--images-per-identity", images, "--seed", "0", "--out", out,
                   "--workers", "1", *extra)
    assert done.returncode == 0, done.stderr
    return out


class _KilledError(Exception):
    pass


def test_centres_are_exact_means_and_resume_after_a_kill(tmp_path, run_cli):
    shards = _shard(run_cli, tmp_path / "shards", identities="5", images="3")
    torch.manual_seed(0)
    model = tmp_path / "enc.onnx"
    export_onnx(_encoder().eval(), model)
    embed = load_embedder(model, device="cpu")
    calls = []

    def dying(batch, *, flip):
        calls.append(len(batch))
        if len(calls) == 3:
            raise _KilledError  # killed while embedding the third batch
        return embed(batch, flip=flip)

    cache = tmp_path / "centres.npz"
    with pytest.raises(_KilledError):
        identity_centres(dying, model, shards, cache, batch_size=4, workers=0, save_every_s=0)
    calls.clear()
    resumed = identity_centres(lambda b, flip: calls.append(len(b)) or embed(b, flip=flip),
                               model, shards, cache, batch_size=4, workers=0)
    assert calls == [4, 3]  # 15 images in batches of 4: steps 2 and 3 only
    whole = identity_centres(embed, model, shards, tmp_path / "other.npz", batch_size=4,
                             workers=0)
    np.testing.assert_array_equal(resumed.sums, whole.sums)
    reader = ShardReader(shards)
    import simplejpeg

    for label in range(5):
        pixels = np.stack([simplejpeg.decode_jpeg(reader.read_image(i)).transpose(2, 0, 1)
                           for i in reader.identity_images(label)])
        features = embed(pixels, flip=True)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        np.testing.assert_allclose(whole.sums[label], features.sum(0), rtol=1e-4, atol=1e-5)
    assert whole.counts.tolist() == [3] * 5
    calls.clear()
    again = identity_centres(lambda b, flip: calls.append(len(b)) or embed(b, flip=flip),
                             model, shards, cache, batch_size=4, workers=0)
    assert calls == [] and np.array_equal(again.sums, whole.sums)  # complete: reused


def _train(shards, epochs: int) -> nn.Module:
    """Real FC training steps (loader, CosFace, SGD) of a small encoder."""
    torch.manual_seed(0)
    encoder = _encoder()
    batch_size = 16
    first = build_loader(shards, batch_size, 0, seed=0, backend="torch", device="cpu", workers=1)
    head = build_head("fc", num_classes=first.num_classes, embedding_size=64,
                      batch_size=batch_size, margin=build_margin("cosface", s=30.0, m=0.2))
    first.close()
    optimizer = make_optimizer([*encoder.parameters(), *head.parameters()], lr=0.1,
                               momentum=0.9, weight_decay=5e-4)
    step = TrainStep(encoder, head, optimizer, device="cpu", precision="fp32",
                     channels_last=False)
    for epoch in range(epochs):
        with build_loader(shards, batch_size, 0, seed=0, epoch=epoch, backend="torch",
                          device="cpu", workers=0) as loader:
            for batch in loader:
                step(batch, 0.1)
    return encoder.eval()


def test_planted_duplicates_and_benchmark_people_found_then_merged_and_excluded(
        tmp_path, run_cli):
    """40 synthetic people x 8 photos, 15 % of the names showing another name's person and 6
    names showing people of a synthetic IJB-C (and of a .bin of the same people); a small
    encoder trained 25 epochs. Measured here at z = 1: duplicate pairs precision 43 %
    (chance 0.4 %), recall 75 %; overlap precision 62.5 % (chance 13 %), recall 83 %."""
    planted = ("--duplicate-share", "0.15", "--plant-benchmark", "6")
    shards = _shard(run_cli, tmp_path / "shards", *planted)
    ijb = tmp_path / "ijb"
    done = run_cli("evaluate", "synth-ijb", "--out", ijb, "--identities", "12", "--seed", "0")
    assert done.returncode == 0, done.stderr
    pairs_bin = tmp_path / "val" / "heldout.bin"  # the same held-out people as pairs
    done = run_cli("evaluate", "synth-bin", "--out", pairs_bin, "--identities", "12",
                   "--pairs", "12", "--seed", "0")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f"shards = {json.dumps(str(shards))}\n")
    model = tmp_path / "enc.onnx"
    export_onnx(_train(shards, 25), model)
    result = run_cli("evaluate", "duplicates", run, "--model", model, "--against", ijb,
                     "--against", pairs_bin.parent, "--z", "1", "--workers", "0", "--device",
                     "cpu", "--thumbnails", "4")
    assert result.returncode == 0, result.stderr
    out = run / "duplicates"
    summary = json.loads((out / "duplicates.json").read_text())
    pairs, overlap = summary["truth"], summary["against"]["truth"]
    assert [(s["name"], s["items"]) for s in summary["against"]["sets"]] == \
        [("ijb:ijbc", 36), ("heldout", 24)]
    assert pairs["planted"] >= 3 and overlap["planted"] == 6
    assert pairs["precision"] >= 20 * pairs["chance"] and pairs["recall"] >= 0.5, pairs
    assert overlap["precision"] >= 2 * overlap["chance"] and overlap["recall"] >= 0.5, overlap
    for name in ("duplicates.png", "duplicates_hist.png", "overlap.png", "overlap_hist.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "![pairs](duplicates.png)" in (out / "duplicates.md").read_text()
    listed = (out / "duplicates.tsv").read_text().splitlines()
    overlapping = [line.split("\t")[0] for line in (out / "overlap.tsv").read_text().splitlines()]
    assert len(listed) == pairs["listed"] + 1 and len(overlapping) == overlap["listed"] + 1
    cleaned = _shard(run_cli, tmp_path / "cleaned", *planted, "--merge", out / "duplicates.tsv",
                     "--exclude", out / "overlap.tsv")
    manifest = json.loads((cleaned / "manifest.json").read_text())
    merged = {row["name"] for row in manifest["merged_identities"]}
    gone = {line.split("\t")[0].split("/")[0].removeprefix("synthetic:")
            for line in (cleaned / "rejected.tsv").read_text().splitlines()[1:]}
    assert gone == set(overlapping[1:])
    assert manifest["num_identities"] == 46 - len(merged - gone) - len(gone)


def test_a_run_without_a_model_or_with_a_wrong_against_is_one_line(tmp_path, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f"shards = {json.dumps(str(tmp_path / 'shards'))}\n")
    assert_one_line_error(run_cli("evaluate", "duplicates", run), "model.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    model = tmp_path / "enc.onnx"
    export_onnx(_encoder().eval(), model)
    assert_one_line_error(run_cli("evaluate", "duplicates", run, "--model", model, "--against",
                                  empty), "--against", "no .bin file")
