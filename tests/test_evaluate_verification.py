"""insightface .bin reading (restricted unpickler) and the 10-fold verification protocol."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from evaluate.verification import evaluate_embeddings, load_bin, read_bin, write_bin


def _jpeg(seed: int, size: int = 112) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_write_then_load_roundtrip(tmp_path):
    jpegs = [_jpeg(i) for i in range(4)] + [_jpeg(9, size=96)]  # one at another size
    jpegs.append(_jpeg(10))
    path = tmp_path / "set.bin"
    write_bin(path, jpegs, [True, False, True])
    images, issame = load_bin(path)
    assert images.shape == (6, 3, 112, 112) and images.dtype == np.uint8
    assert issame.tolist() == [True, False, True]
    expected = np.asarray(Image.open(io.BytesIO(jpegs[0])).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(images[0], expected)


@pytest.mark.parametrize("protocol", [2, 4])
def test_python3_protocols_and_numpy_bools_load(tmp_path, protocol):
    """Old files: protocol 2 bytes (via _codecs.encode), numpy.bool_ flags."""
    path = tmp_path / "old.bin"
    with open(path, "wb") as f:
        pickle.dump(([b"\xff\xd8a", b"\x00b"], [np.bool_(True)]), f, protocol=protocol)
    images, issame = read_bin(path)
    assert images == [b"\xff\xd8a", b"\x00b"] and issame.tolist() == [True]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("payload", [
    ([b"a", b"b"], [Evil()]),
    ([b"a", b"b"], [np.float64(1.0)]),
    ([b"a", "text"], [True]),
    ({"images": []}, [True]),
])
def test_restricted_unpickler_refuses_other_content(tmp_path, payload):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UserError) as info:
        read_bin(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_mismatched_counts_are_refused(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(pickle.dumps(([b"a"], [True]), protocol=4))
    with pytest.raises(UserError, match="1 images for 1 pairs"):
        read_bin(path)


def _reference_accuracy(embeddings, issame, nfolds=10):
    """insightface verification.calculate_roc written as plain loops (accuracy part)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    dist = ((unit[0::2] - unit[1::2]) ** 2).sum(1)
    thresholds = np.arange(0, 4, 0.01)
    n = len(issame)
    folds = np.array_split(np.arange(n), nfolds)
    accs = []
    for test in folds:
        train = np.setdiff1d(np.arange(n), test)
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < best) == issame[test]))
    return np.mean(accs), np.std(accs)


def test_accuracy_matches_loop_reference_on_random_data():
    rng = np.random.default_rng(0)
    pairs = 303  # not a multiple of 10: unequal folds
    base = rng.normal(size=(pairs, 16))
    issame = rng.random(pairs) < 0.5
    other = np.where(issame[:, None], base + 0.8 * rng.normal(size=base.shape),
                     rng.normal(size=base.shape))
    embeddings = np.empty((2 * pairs, 16))
    embeddings[0::2], embeddings[1::2] = base, other
    result = evaluate_embeddings(embeddings, issame)
    mean, std = _reference_accuracy(embeddings, issame)
    assert result["accuracy_mean"] == pytest.approx(mean, abs=1e-12)
    assert result["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert 0.6 < result["accuracy_mean"] < 1.0


def test_separable_pairs_score_perfectly():
    same = np.array([[1.0, 0.0], [1.0, 0.01]] * 10)
    diff = np.array([[1.0, 0.0], [0.0, 1.0]] * 10)
    embeddings = np.concatenate([same, diff])
    issame = np.array([True] * 10 + [False] * 10)
    result = evaluate_embeddings(embeddings, issame)
    assert result["accuracy_mean"] == 1.0 and result["accuracy_std"] == 0.0


def test_lfw_style_pairs_folder(tmp_path):
    from evaluate.verification import load_pairs_dir

    for name, count in (("Ann_A", 2), ("Bob_B", 1)):
        (tmp_path / name).mkdir()
        for i in range(1, count + 1):
            (tmp_path / name / f"{name}_{i:04d}.jpg").write_bytes(_jpeg(i + len(name)))
    (tmp_path / "pairs.txt").write_text("1\t2\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t1\n")
    images, issame = load_pairs_dir(tmp_path)
    assert images.shape == (4, 3, 112, 112) and issame.tolist() == [True, False]
    (tmp_path / "pairs.txt").write_text("Ann_A\t1\t2\nAnn_A\t1\tBob_B\t9\n")
    with pytest.raises(UserError, match=r"Bob_B_0009\.jpg: missing"):
        load_pairs_dir(tmp_path)
    (tmp_path / "pairs.txt").write_text("Ann_A\t1\t2\nAnn_A\tone\n")
    with pytest.raises(UserError, match=r"pairs\.txt:2: expected"):
        load_pairs_dir(tmp_path)
