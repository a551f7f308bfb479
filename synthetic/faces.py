"""Procedural face-like identities: a dataset that needs no download, for demos and tests.

A person's appearance is a pure function of (seed, identity) and a photo of them a pure
function of (seed, identity, image_index), so any process can render any image on its own
and identities beyond those used for training are unseen ("held-out") people. About a
fifth of the photos are degraded (blur, occlusion, low resolution, heavy noise) so that
quality-aware weighting such as AttFC's attention has something to work on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import simplejpeg

from common.alignment import ALIGNED_SIZE, ARCFACE_TEMPLATE
from synthetic.params import (
    FAMILY_SIZE,
    Person,
    Shot,
    blend_family,
    drift_person,
    sample_person,
    sample_shot,
)
from synthetic.render import TEMPLATE_CENTER, Canvas, feature_points, finish, paint_face

# Stream tags keep the identity and photo random streams apart (SeedSequence pads short
# entropy with zeros, so [seed, id] alone could collide with [seed, id, 0]).
_IDENTITY_STREAM = 0x1DE7
_FAMILY_STREAM = 0xFA31
_SHOT_STREAM = 0x5A07
_MISLABEL_STREAM = 0x3157
# Photo indices of strays (a person's photo filed under someone else) start here, so a stray
# is never a duplicate of one of that person's own photos.
_STRAY_PHOTO_BASE = 1 << 40
_TEMPLATE_IOD = float(np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0]))


@dataclass(frozen=True)
class SyntheticFace:
    """One rendered photo: RGB pixels, its 5 landmarks (x, y) and what damage it has."""

    image: np.ndarray
    landmarks: np.ndarray
    quality: str


def identity_name(identity: int) -> str:
    """Stable folder-style name, so synthetic identities sort like real ones."""
    return f"synth_{identity:07d}"


@lru_cache(maxsize=16384)
def _person(seed: int, identity: int) -> Person:
    """A person: their own random traits pulled towards their family's (look-alikes)."""
    family = np.random.default_rng([seed, identity // FAMILY_SIZE, _FAMILY_STREAM])
    own = np.random.default_rng([seed, identity, _IDENTITY_STREAM])
    return blend_family(sample_person(family), sample_person(own))


def render_face(identity: int, image_index: int, *, seed: int = 0,
                loose: bool = False) -> SyntheticFace:
    """Render photo `image_index` of person `identity`, aligned 112x112 or as a loose crop.

    The loose and aligned renders of the same arguments are the same photo (same
    expression, light and damage) seen through a different camera placement.
    """
    for name, value in (("identity", identity), ("image_index", image_index), ("seed", seed)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    rng = np.random.default_rng([seed, identity, image_index, _SHOT_STREAM])
    shot = sample_shot(rng)
    person = drift_person(_person(int(seed), int(identity)), rng)
    if loose:
        width, height, to_image = _loose_placement(shot, rng)
    else:
        width = height = ALIGNED_SIZE
        to_image = _pose(shot, shot.roll_deg, shot.scale, np.add(TEMPLATE_CENTER, shot.shift))
    points = feature_points(person, shot)
    canvas = Canvas(width, height, to_image)
    paint_face(canvas, person, shot, points)
    image = finish(canvas, shot, rng)
    landmarks = points @ to_image[:, :2].T + to_image[:, 2]
    return SyntheticFace(image, landmarks.astype(np.float32), shot.quality)


def photo_subject(identity: int, image_index: int, *, seed: int, mislabeled_share: float,
                  identities: int) -> tuple[int, int]:
    """(person shown, their photo index) for photo `image_index` filed under `identity`.

    With probability `mislabeled_share` (a pure function of seed, identity and index) the
    photo shows another of the `identities` people instead: planted label noise whose truth
    the shards record. Share 0 is the plain dataset: (identity, image_index).
    """
    if mislabeled_share <= 0 or identities < 2:
        return identity, image_index
    rng = np.random.default_rng([seed, identity, image_index, _MISLABEL_STREAM])
    if rng.random() >= mislabeled_share:
        return identity, image_index
    other = int(rng.integers(identities - 1))
    other += other >= identity
    return other, _STRAY_PHOTO_BASE + identity * (1 << 16) + image_index


def _pose(shot: Shot, roll_deg: float, scale: float, center: np.ndarray) -> np.ndarray:
    """Canonical -> image affine: yaw squeeze, scale and roll about the face centre."""
    angle = np.deg2rad(roll_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    linear = scale * rotation @ np.diag([1.0 - 0.12 * abs(shot.yaw), 1.0])
    offset = np.asarray(center, np.float64) - linear @ np.asarray(TEMPLATE_CENTER)
    return np.hstack([linear, offset[:, None]])


def _loose_placement(shot: Shot, rng: np.random.Generator) -> tuple[int, int, np.ndarray]:
    """A detector-style loose crop: face of 25-60 px inter-ocular distance, rolled up to 20
    degrees, somewhere on a 150-260 px canvas."""
    scale = rng.uniform(25.0, 60.0) / _TEMPLATE_IOD
    face = ALIGNED_SIZE * scale
    width, height = (int(rng.integers(min(260, max(150, int(face))), 261)) for _ in range(2))
    center = np.array([_place(rng, width, face), _place(rng, height, face)])
    to_image = _pose(shot, rng.uniform(-20.0, 20.0), scale, center)
    return width, height, to_image


def _place(rng: np.random.Generator, size: int, face: float) -> float:
    """Face centre along one canvas axis, keeping most of the face inside."""
    margin = 0.42 * face
    return float(rng.uniform(margin, size - margin)) if size > 2 * margin else 0.5 * size


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Baseline JPEG with 4:2:0 chroma, the way face datasets are usually stored."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality,
                                  colorspace="RGB", colorsubsampling="420")
