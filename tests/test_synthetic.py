"""The synthetic face source: determinism, landmark geometry, quality mix, JPEGs, learnability."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import simplejpeg

from common.alignment import ARCFACE_TEMPLATE
from synthetic.faces import (
    SyntheticFace,
    encode_jpeg,
    identity_name,
    render_face,
)

IDENTITIES = 50
IMAGES = 10


@pytest.fixture(scope="module")
def faces() -> dict[tuple[int, int], SyntheticFace]:
    """50 identities x 10 aligned photos, shared by the statistical tests."""
    return {(i, j): render_face(i, j) for i in range(IDENTITIES) for j in range(IMAGES)}


def test_identity_name_is_zero_padded() -> None:
    assert identity_name(123) == "synth_0000123"
    assert identity_name(0) == "synth_0000000"


def test_same_arguments_give_identical_pixels() -> None:
    a, b = render_face(7, 3, seed=5), render_face(7, 3, seed=5)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.landmarks, b.landmarks)
    assert a.quality == b.quality
    c, d = render_face(7, 3, seed=5, loose=True), render_face(7, 3, seed=5, loose=True)
    assert np.array_equal(c.image, d.image) and np.array_equal(c.landmarks, d.landmarks)


def test_identity_image_and_seed_all_change_the_picture() -> None:
    base = render_face(7, 3).image
    for other in (render_face(8, 3), render_face(7, 4), render_face(7, 3, seed=1)):
        assert np.abs(other.image.astype(int) - base).mean() > 5


def test_appearance_does_not_depend_on_render_order_or_population() -> None:
    """A held-out identity is the same person whatever was rendered before it."""
    first = render_face(5000, 2)
    for identity in range(20):
        render_face(identity, 0)
    again = render_face(5000, 2)
    assert np.array_equal(first.image, again.image)


def test_rejects_negative_arguments() -> None:
    with pytest.raises(ValueError, match="identity"):
        render_face(-1, 0)


def test_shapes_and_dtypes() -> None:
    aligned = render_face(1, 1)
    assert aligned.image.shape == (112, 112, 3) and aligned.image.dtype == np.uint8
    assert aligned.image.flags.c_contiguous
    assert aligned.landmarks.shape == (5, 2) and aligned.landmarks.dtype == np.float32
    for identity in range(10):
        loose = render_face(identity, 0, loose=True)
        h, w, c = loose.image.shape
        assert 150 <= h <= 260 and 150 <= w <= 260 and c == 3
        assert loose.image.dtype == np.uint8 and loose.landmarks.dtype == np.float32
        assert np.all(loose.landmarks >= 0) and np.all(loose.landmarks < [w, h])


def test_aligned_landmarks_sit_near_the_arcface_template(faces) -> None:
    errors = np.stack([f.landmarks - ARCFACE_TEMPLATE for f in faces.values()])
    distance = np.linalg.norm(errors, axis=-1)
    assert distance.mean() < 4.0
    assert distance.max() < 12.0
    assert np.abs(errors.mean(axis=0)).max() < 1.5  # jitter is centred on the template


def test_eye_landmarks_sit_on_the_drawn_eyes(faces) -> None:
    """Pupils and lashes are dark: a 5x5 patch at each eye landmark is under 0.7x as bright
    as the cheek 12 px below it, in every undamaged photo (typically 0.15x)."""
    for face in faces.values():
        if face.quality != "good":
            continue
        grey = face.image.astype(np.float64).mean(axis=-1)
        for x, y in np.round(face.landmarks[:2]).astype(int):
            eye = grey[y - 2:y + 3, x - 2:x + 3].min()
            cheek = grey[y + 10:y + 15, x - 2:x + 3].min()
            assert eye < 0.7 * cheek


def test_quality_mix(faces) -> None:
    counts = Counter(f.quality for f in faces.values())
    assert set(counts) == {"good", "blur", "occluded", "lowres", "noisy"}
    assert 0.15 < 1 - counts["good"] / len(faces) < 0.30


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity src -> dst as a 2x3 matrix (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    flip = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ flip @ vt
    scale = np.trace(np.diag(sigma) @ flip) / s.var(0).sum()
    linear = scale * rotation
    return np.hstack([linear, (mu_d - linear @ mu_s)[:, None]])


def _warp_to_template(image: np.ndarray, to_template: np.ndarray) -> np.ndarray:
    """Bilinear inverse warp onto 112x112 (pixel centres at integers, as cv2 does)."""
    inverse = np.linalg.inv(np.vstack([to_template, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    h, w = image.shape[:2]
    x0 = np.clip(np.floor(sx).astype(int), 0, w - 2)
    y0 = np.clip(np.floor(sy).astype(int), 0, h - 2)
    fx = np.clip(sx - x0, 0, 1)[..., None]
    fy = np.clip(sy - y0, 0, 1)[..., None]
    img = image.astype(np.float64)
    top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
    bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _face_vector(image: np.ndarray) -> np.ndarray:
    """Central face region, grey, 4x4-pooled, zero-mean unit-norm: a crude descriptor."""
    grey = image[24:104, 24:88].astype(np.float64).mean(axis=-1)
    grey = grey.reshape(20, 4, 16, 4).mean(axis=(1, 3))
    grey -= grey.mean()
    return (grey / (np.linalg.norm(grey) + 1e-9)).ravel()


def _aligned_vector(face: SyntheticFace) -> np.ndarray:
    """Align by the face's own landmarks, the way an evaluation pipeline would."""
    to_template = _umeyama(face.landmarks.astype(np.float64), ARCFACE_TEMPLATE)
    moved = face.landmarks @ to_template[:, :2].T + to_template[:, 2]
    assert np.sqrt(((moved - ARCFACE_TEMPLATE) ** 2).sum(-1).mean()) < 4.5
    return _face_vector(_warp_to_template(face.image, to_template))


def test_aligning_a_loose_crop_recovers_the_aligned_face() -> None:
    """Loose and aligned renders of one photo align to the same picture, unlike other people."""
    ids = range(12)
    aligned = np.stack([_aligned_vector(render_face(i, 4)) for i in ids])
    for row, identity in enumerate(ids):
        similarity = aligned @ _aligned_vector(render_face(identity, 4, loose=True))
        assert similarity[row] > 0.95
        assert similarity.argmax() == row


def test_jpeg_round_trip_is_a_baseline_112_image() -> None:
    image = render_face(3, 0).image
    data = encode_jpeg(image)
    assert data[:2] == b"\xff\xd8" and b"\xff\xc0" in data and b"\xff\xc2" not in data
    decoded = simplejpeg.decode_jpeg(data)
    assert decoded.shape == (112, 112, 3)
    assert np.abs(decoded.astype(int) - image).mean() < 6
    assert len(encode_jpeg(image, quality=50)) < len(data)


def test_identities_are_learnable_but_not_trivially(faces) -> None:
    """Nearest class mean on raw 28x28 pixels: well above chance (2%), far from perfect."""
    def features(image: np.ndarray) -> np.ndarray:
        small = image.astype(np.float64).reshape(28, 4, 28, 4, 3).mean(axis=(1, 3))
        small -= small.mean()
        return (small / (small.std() + 1e-9)).ravel()

    x = np.stack([[features(faces[i, j].image) for j in range(IMAGES)]
                  for i in range(IDENTITIES)])
    train, test = x[:, : IMAGES // 2], x[:, IMAGES // 2:]
    means = train.mean(axis=1)
    queries = test.reshape(-1, x.shape[-1])
    labels = np.repeat(np.arange(IDENTITIES), IMAGES - IMAGES // 2)
    distances = ((queries[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == labels).mean()
    print(f"nearest-class-mean accuracy {accuracy:.3f} (chance 0.02)")
    assert 4 / IDENTITIES < accuracy < 0.9, accuracy
