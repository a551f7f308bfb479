"""Align a loose face crop to ArcFace's 112x112 template with its five landmarks.

Same geometry as insightface's ``norm_crop``: the least-squares similarity transform
(rotation, uniform scale, translation; Umeyama 1991) from the landmarks onto the template,
then a bilinear warp with black outside the source. Models trained on aligned 112x112 crops
only see faces placed this way, so any other alignment costs accuracy.

Landmarks a little outside the crop happen (a face cut by the frame) and are warped as is,
black filling the missing part. A landmark farther out than ``OUTSIDE_TOLERANCE`` of the image
size cannot belong to this image (wrong file, wrong line, swapped x/y) and is an error.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from common.alignment import ALIGNED_SIZE, ARCFACE_TEMPLATE
from common.errors import UserError

OUTSIDE_TOLERANCE = 0.1


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix M of the similarity minimising sum |M [src; 1] - dst|^2 (Umeyama)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    reflect = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # best fit is a mirror: forbid it
        reflect[1, 1] = -1
    rotation = u @ reflect @ vt
    variance = (src_c ** 2).sum() / len(src)
    if variance <= 0:
        raise ValueError("landmarks are all the same point")
    scale = np.trace(np.diag(singular) @ reflect) / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def check_landmarks(landmarks: np.ndarray, width: int, height: int, where: str) -> None:
    """Refuse landmarks that are far outside the image (see module docstring)."""
    margin_x, margin_y = OUTSIDE_TOLERANCE * width, OUTSIDE_TOLERANCE * height
    x, y = landmarks[:, 0], landmarks[:, 1]
    outside = (x < -margin_x) | (x > width + margin_x) | (y < -margin_y) | (y > height + margin_y)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise UserError(f"{where}: landmark {i + 1} at ({x[i]:.1f}, {y[i]:.1f}) is outside the "
                        f"{width}x{height} image")


def align_face(image: np.ndarray, landmarks: np.ndarray, where: str = "image") -> np.ndarray:
    """uint8 [112,112,3] aligned face from an RGB uint8 [H,W,3] image and its 5 landmarks."""
    height, width = image.shape[:2]
    landmarks = np.asarray(landmarks, np.float64)
    check_landmarks(landmarks, width, height, where)
    forward = np.vstack([similarity_transform(landmarks, ARCFACE_TEMPLATE), [0, 0, 1]])
    inverse = np.linalg.inv(forward)[:2]
    # PIL samples output pixel centres at (u+0.5, v+0.5) in a frame where source pixel i
    # spans [i, i+1); landmark/template coordinates put pixel centres on integers.
    a, b, c = inverse[0]
    d, e, f = inverse[1]
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    warped = Image.fromarray(image).transform((ALIGNED_SIZE, ALIGNED_SIZE), Image.AFFINE,
                                              coeffs, resample=Image.BILINEAR, fillcolor=0)
    return np.asarray(warped)
