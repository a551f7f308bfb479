"""5-point alignment: the similarity fit is exact, and warped landmarks land on the template."""

from __future__ import annotations

import numpy as np
import pytest

from common.alignment import ARCFACE_TEMPLATE
from common.errors import UserError
from evaluate.align import align_face, similarity_transform
from synthetic.faces import render_face


def _similar_points(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return scale * ARCFACE_TEMPLATE.astype(np.float64) @ np.array([[c, s], [-s, c]]) + shift


def test_umeyama_recovers_an_exact_similarity():
    src = _similar_points(0.4, 1.8, (30.0, 12.0))
    matrix = similarity_transform(src, ARCFACE_TEMPLATE)
    mapped = src @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, ARCFACE_TEMPLATE, atol=1e-9)
    assert np.linalg.det(matrix[:, :2]) > 0  # never a mirror image


def _blob_image(points: np.ndarray, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    image = np.zeros((height, width, 3), np.uint8)
    for x, y in points:
        blob = 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.5 ** 2))
        image[..., 0] = np.maximum(image[..., 0], blob.astype(np.uint8))
    return image


@pytest.mark.parametrize("identity", [0, 1, 2, 3])
def test_aligned_landmarks_on_template_within_one_pixel(identity):
    """Blobs drawn at a synthetic loose crop's landmarks end up on ArcFace's template."""
    face = render_face(identity, 0, seed=7, loose=True)
    height, width = face.image.shape[:2]
    aligned = align_face(_blob_image(face.landmarks, height, width), face.landmarks)
    assert aligned.shape == (112, 112, 3)
    yy, xx = np.mgrid[:112, :112]
    # the fit is least squares: the rendered landmarks are not an exact similarity of the
    # template, so compare with where the transform sends them
    matrix = similarity_transform(face.landmarks, ARCFACE_TEMPLATE)
    expected = face.landmarks.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(expected - ARCFACE_TEMPLATE).max() < 8  # near the template anyway
    red = aligned[..., 0].astype(np.float64)
    for x, y in expected:
        near = ((xx - x) ** 2 + (yy - y) ** 2) < 5 ** 2
        weight = red * near
        centre = np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()
        assert np.hypot(*(centre - (x, y))) < 1.0


def test_exact_similarity_lands_on_template():
    src = _similar_points(-0.3, 1.6, (40.0, 25.0))
    aligned = align_face(_blob_image(src, 240, 220), src)[..., 0].astype(np.float64)
    yy, xx = np.mgrid[:112, :112]
    for x, y in ARCFACE_TEMPLATE:
        weight = aligned * (((xx - x) ** 2 + (yy - y) ** 2) < 5 ** 2)
        centre = np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()
        assert np.hypot(*(centre - (x, y))) < 1.0


def test_landmarks_far_outside_the_image_are_an_error():
    image = np.zeros((100, 80, 3), np.uint8)
    inside = np.array([[20, 30], [60, 30], [40, 50], [25, 70], [55, 70]], np.float64)
    align_face(image, inside - [5, 0])  # slightly outside (x = -5 > -10% of 80): accepted
    bad = inside.copy()
    bad[2] = (40, 250)
    with pytest.raises(UserError, match=r"x\.jpg: landmark 3 at \(40\.0, 250\.0\) is outside"):
        align_face(image, bad, where="x.jpg")
