"""Template pooling, pair scores, ROC/TAR@FAR and 1:N metrics: by hand and vs the loops."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bench import ijb_eval as bench
from bench import ijb_reference as reference
from common.errors import UserError
from evaluate import ijb
from evaluate.pairs import pair_scores
from evaluate.roc import roc_curve, tar_at_far
from evaluate.search import Gallery, closed_set_metrics, faiss_gpu, mates, open_set_metrics
from evaluate.templates import pool_templates


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_pooling_by_hand():
    features = np.array([[1, 0], [3, 0], [0, 2], [5, 5], [0, 1]], np.float32)
    templates = np.array([7, 7, 7, 3, 7])
    medias = np.array([1, 1, 2, 9, 1])  # template 7: media 1 = rows 0,1,4; media 2 = row 2
    faceness = np.array([1.0, 1.0, 0.5, 2.0, 3.0])
    pooled = pool_templates(features, templates, medias, faceness)
    assert pooled.ids.tolist() == [3, 7]
    media1 = (np.array([1, 0]) + np.array([3, 0]) + 3 * np.array([0, 1])) / 3
    media2 = 0.5 * np.array([0, 2])
    np.testing.assert_allclose(pooled.features[1], _unit(media1 + media2))
    np.testing.assert_allclose(pooled.features[0], _unit([1, 1]))


def test_pooling_matches_loop_reference_on_random_data():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(500, 70)).astype(np.float32)  # 70: not a multiple of 64
    templates = rng.integers(0, 40, 500)
    medias = rng.integers(0, 60, 500)
    faceness = rng.uniform(0.3, 1.0, 500)
    pooled = pool_templates(features, templates, medias, faceness)
    expected, ids, _ = reference.template_features(
        reference.image_inputs(features, faceness), templates, medias)
    np.testing.assert_array_equal(pooled.ids, ids)
    np.testing.assert_allclose(pooled.features, expected, rtol=0, atol=1e-13)


def test_template_without_images_names_the_pair_file():
    pooled = pool_templates(np.eye(2, dtype=np.float32), np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(UserError, match=r"pairs.txt: 1 template\(s\) have no images.*5"):
        pooled.rows(np.array([1, 5, 2]), "pairs.txt")


@pytest.mark.parametrize("dense_block", [True, False])
def test_pair_scores_dense_and_gathered_paths(monkeypatch, dense_block):
    import evaluate.pairs as pairs_module

    monkeypatch.setattr(pairs_module, "DENSE_FACTOR", 10**9 if dense_block else 0)
    rng = np.random.default_rng(2)
    feats = _unit(rng.normal(size=(50, 16)))
    rows1, rows2 = rng.integers(0, 10, 3000), rng.integers(10, 50, 3000)
    scores = pair_scores(feats, rows1, rows2, block_bytes=8 * 40 * 3)  # several blocks
    np.testing.assert_allclose(scores, np.sum(feats[rows1] * feats[rows2], 1), atol=1e-14)
    hand = pair_scores(np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]),
                       np.array([0, 0, 2]), np.array([1, 2, 2]))
    np.testing.assert_allclose(hand, [0.0, 0.6, 1.0])


def test_roc_by_hand():
    # scores desc: 0.9(+) 0.8(-) 0.8(+) 0.7(-) 0.6(+) 0.2(-)
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.2])
    fpr, tpr, thresholds = roc_curve(labels, scores)
    # distinct thresholds .9 .8 .7 .6 .2 -> (fp,tp) (0,1) (1,2) (2,2) (2,3) (3,3); none collinear
    np.testing.assert_allclose(fpr, np.array([0, 0, 1, 2, 2, 3]) / 3)
    np.testing.assert_allclose(tpr, np.array([0, 1, 2, 2, 3, 3]) / 3)
    assert thresholds[0] == np.inf and thresholds[1:].tolist() == [0.9, 0.8, 0.7, 0.6, 0.2]
    # FAR 0.01 -> nearest FPR 0 (points 0 and 1): the later point wins, TAR 1/3
    # FAR 0.5 -> |1/3-.5| = |2/3-.5|: tie between points 2 and 3/4: the last, TAR 1
    result = tar_at_far(fpr, tpr, fars=(0.01, 0.5))
    assert result == {"0.01": pytest.approx(1 / 3), "0.5": pytest.approx(1.0)}


def test_roc_drops_collinear_points_like_sklearn():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([6, 5, 4, 3, 2, 1], float)
    fpr, tpr, _ = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])


@pytest.mark.parametrize(("seed", "decimals", "genuine"), [
    (3, 2, 0.05), (4, 1, 0.3), (5, None, 0.01), (6, 3, 0.5), (7, 0, 0.2)])
def test_roc_matches_reference_on_random_scores(seed, decimals, genuine):
    rng = np.random.default_rng(seed)
    labels = (rng.random(20000) < genuine).astype(np.int8)
    scores = rng.normal(size=20000) + 2 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # ties, also between genuine and impostor
    fpr, tpr, _ = roc_curve(labels, scores)
    ref_fpr, ref_tpr = reference.sklearn_roc(labels, scores)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)
    assert tar_at_far(fpr, tpr) == reference.tar_at_far(labels, scores)


@pytest.mark.parametrize(("seed", "decimals"), [(8, None), (9, 1), (10, 2)])
def test_roc_cut_at_max_fpr_gives_the_same_tar(seed, decimals):
    rng = np.random.default_rng(seed)
    labels = (rng.random(30000) < 0.1).astype(np.int8)
    scores = rng.normal(size=30000) + 1.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    full = roc_curve(labels, scores)
    cut = roc_curve(labels, scores, max_fpr=0.3)
    assert cut[0][-1] >= 0.3 and len(cut[0]) < len(full[0])
    np.testing.assert_array_equal(cut[0][:-1], full[0][:len(cut[0]) - 1])
    np.testing.assert_array_equal(cut[1][:-1], full[1][:len(cut[1]) - 1])
    assert tar_at_far(*cut[:2]) == tar_at_far(*full[:2])


def test_closed_set_by_hand():
    gallery = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    probes = _unit([[1, 0.1, 0], [0.2, 1, 0.5], [0.9, 0, 0.3]])
    mate = np.array([0, 1, 2])  # probe 2 is closer to gallery 0 than to its mate
    result = closed_set_metrics(Gallery(gallery), probes, mate)
    assert result.top == {1: pytest.approx(2 / 3), 5: 1.0, 10: 1.0}
    # non-mate scores: p0: .0995,0 | p1: .1826,.4564 | p2: .9487,0 -> ceil(3*.01)=1st = .9487
    assert result.thresholds["0.01"] == pytest.approx(np.sqrt(0.9))
    assert result.tpir_at_fpir["0.01"] == pytest.approx(1 / 3)  # only p0 (.995) beats .9487
    assert result.tpir_at_fpir["0.1"] == pytest.approx(1 / 3)


def test_closed_set_matches_reference_with_growing_k():
    rng = np.random.default_rng(4)
    gallery = _unit(rng.normal(size=(60, 8)))
    mate = rng.integers(0, 60, 300)
    probes = _unit(gallery[mate] + 0.9 * rng.normal(size=(300, 8)))
    # distractors crowding probe 0: its non-mate scores dominate, so k must grow for it
    distractors = (probes[0] + 0.01 * rng.normal(size=(80, 8))).astype(np.float32)
    ours = closed_set_metrics(Gallery(gallery, distractors), probes, mate)
    full = np.concatenate([gallery, _unit(distractors)])
    expected = reference.identification(probes, full, list(mate))
    assert {f"top{k}": v for k, v in ours.top.items()} == pytest.approx(
        {k: expected[k] for k in ("top1", "top5", "top10")})
    assert ours.tpir_at_fpir == pytest.approx(expected["tpir_at_fpir"])


@pytest.mark.parametrize(("device", "num_gpus", "gpu"), [
    ("cuda:1", 2, 1), ("cuda", 2, 0), ("auto", 2, 0), ("cpu", 2, None), ("auto", 0, None),
    ("cuda:1", 0, None)])  # no GPU in faiss (faiss-cpu): the CPU index
def test_faiss_searches_on_the_gpu_of_device(device, num_gpus, gpu):
    assert faiss_gpu(device, num_gpus) == gpu


@pytest.mark.parametrize(("device", "message"), [
    ("cuda:2", "--device cuda:2: faiss sees 2 GPU(s)"), ("gpu1", "expected auto, cpu")])
def test_faiss_device_errors(device, message):
    with pytest.raises(UserError, match=re.escape(message)):
        faiss_gpu(device, 2)


def test_open_set_by_hand():
    gallery = _unit([[1, 0], [0, 1]])
    probes = _unit([[1, 0.1], [0.1, 1], [1, 1], [1, -0.5]])
    mate = mates(np.array([10, 11, 12, 13]), np.array([10, 11]), "g")
    assert mate.tolist() == [0, 1, -1, -1]
    result = open_set_metrics(Gallery(gallery), probes, mate)
    # non-mated best scores: .7071 (p2), .8944 (p3); FPIR .01 / .1 -> threshold .8944
    assert result["top1"] == 1.0 and result["num_non_mated"] == 2
    assert result["tpir_at_fpir"] == {"0.01": 1.0, "0.1": 1.0}


def test_duplicate_gallery_subject_is_an_error():
    with pytest.raises(UserError, match="subject 4 has 2 gallery templates"):
        mates(np.array([4]), np.array([4, 4, 5]), "gallery.csv")


def test_whole_protocol_matches_reference_exactly():
    images, features, faceness, protocol = bench.synthetic_protocol(0.002, seed=5, dim=32)
    ours = bench.flatten(ijb.score(images, features, faceness, protocol).metrics)
    theirs = bench.flatten(bench.run_reference(images, features, faceness, protocol))
    assert ours == theirs
    assert 0 < ours["tar_at_far/0.0001"] < 1
