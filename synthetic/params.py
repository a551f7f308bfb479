"""Random parameters of synthetic people (who they are) and shots (how one photo differs).

Kept apart from the drawing code so that the *distribution* of identities and of photo
conditions -- which decides how hard the synthetic task is -- can be read in one place.
All coordinates are in the canonical 112x112 ArcFace frame ("template pixels").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

import numpy as np

Color = tuple[float, float, float]

QUALITIES = ("good", "blur", "occluded", "lowres", "noisy")
LOW_QUALITY_SHARE = 0.22
# Consecutive identities form families of look-alikes: hard impostor pairs, so that low-FAR
# metrics do not saturate. An individual keeps this share of their own traits.
FAMILY_SIZE = 3
INDIVIDUALITY = 0.55
# Each photo moves a person's numeric traits by this many population standard deviations
# (age, make-up, camera): identities close in trait space become genuinely confusable.
SHOT_DRIFT = 0.4
_COLOR_DRIFT = 0.2  # colours drift less: hair should not turn from brown to red
_WAVE_PHASE_DRIFT = 0.6

_LIGHT_SKIN = np.array([238.0, 204.0, 180.0])
_DARK_SKIN = np.array([98.0, 66.0, 48.0])
_HAIR = np.array([[25, 20, 18], [60, 40, 28], [105, 70, 40], [190, 150, 90],
                  [150, 70, 35], [165, 160, 155], [40, 35, 45]], dtype=np.float64)
_IRIS = np.array([[70, 45, 25], [35, 25, 20], [70, 110, 160], [80, 120, 70],
                  [120, 95, 50], [110, 120, 130]], dtype=np.float64)


@dataclass(frozen=True)
class Person:
    """Appearance of one synthetic person: geometry, colours and skin marks."""

    skin: Color
    face_center_y: float
    face_ax: float
    face_ay: float
    jaw: float
    hair: Color
    hairline_y: float
    hairline_curve: float
    hair_volume: float
    long_hair: bool
    bald: bool
    ear_size: tuple[float, float]
    eye_offset: tuple[float, float]  # (half-spacing change, height change)
    eye_size: tuple[float, float]
    eye_tilt: float
    iris: Color
    iris_radius: float
    brow_gap: float
    brow_thickness: float
    brow_length: float
    brow_arch: float
    brow_color: Color
    nose_offset: float
    nose_width: float
    nose_bridge: float
    mouth_offset: tuple[float, float]  # (half-width change, height change)
    lip_thickness: tuple[float, float]
    lip_color: Color
    mouth_curve: float
    waves: tuple[tuple[float, float, float, float], ...]  # (kx, ky, phase, amplitude)
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    beard: float  # 0 = none, else opacity
    glasses: Color | None


@dataclass(frozen=True)
class Shot:
    """Conditions of one photo of a person: pose, expression, light and damage."""

    roll_deg: float
    scale: float
    shift: tuple[float, float]
    yaw: float
    smile: float
    mouth_open: float
    eye_open: float
    brow_raise: float
    light_dir: float
    light_strength: float
    brightness: float
    contrast: float
    cast: Color
    background: Color
    background_tilt: tuple[float, float]  # (direction, intensity change across the face)
    clothing: Color
    noise_sigma: float
    quality: str
    occluder: str  # "", "sunglasses", "rectangle", "hand"
    occluder_box: tuple[float, float, float, float]  # (cx, cy, half-width, half-height)
    occluder_color: Color
    glasses_roll: float  # wearers take glasses off sometimes, others borrow some
    hair_shift: float
    damage: float  # blur radius, low-res factor, or noise sigma, in template pixels


_NUMERIC_TRAITS = tuple(f.name for f in fields(Person)
                        if f.type in ("float", "Color", "tuple[float, float]"))
_COLOR_TRAITS = tuple(f.name for f in fields(Person) if f.type == "Color")


def _color(rng: np.random.Generator, base: np.ndarray, jitter: float) -> Color:
    c = np.clip(base + rng.normal(0.0, jitter, 3), 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def sample_person(rng: np.random.Generator) -> Person:
    """Draw a person; every field that tells people apart comes from here."""
    skin = _color(rng, _LIGHT_SKIN + rng.beta(1.6, 2.2) * (_DARK_SKIN - _LIGHT_SKIN), 6.0)
    hair_base = _HAIR[rng.integers(len(_HAIR))]
    hair = _color(rng, hair_base, 12.0)
    waves = tuple(
        (float(f * np.cos(a)), float(f * np.sin(a)), float(rng.uniform(0, 2 * np.pi)),
         float(rng.uniform(0.015, 0.05)))
        for f, a in zip(rng.uniform(0.15, 0.5, 3), rng.uniform(0, np.pi, 3))
    )
    moles = tuple(
        (float(rng.uniform(30, 82)), float(rng.uniform(40, 100)), float(rng.uniform(0.8, 1.8)))
        for _ in range(rng.integers(0, 4))
    )
    has_glasses = rng.random() < 0.15
    return Person(
        skin=skin,
        face_center_y=float(rng.uniform(57, 64)),
        face_ax=float(rng.uniform(34, 43)),
        face_ay=float(rng.uniform(45, 54)),
        jaw=float(rng.uniform(0.62, 0.95)),
        hair=hair,
        hairline_y=float(rng.uniform(10, 27)),
        hairline_curve=float(rng.uniform(-0.012, 0.016)),
        hair_volume=float(rng.uniform(2, 12)),
        long_hair=bool(rng.random() < 0.3),
        bald=bool(rng.random() < 0.08),
        ear_size=(float(rng.uniform(5, 9)), float(rng.uniform(9, 14))),
        eye_offset=(float(rng.uniform(-3, 3)), float(rng.uniform(-2.5, 2.5))),
        eye_size=(float(rng.uniform(4.5, 7.0)), float(rng.uniform(2.0, 3.6))),
        eye_tilt=float(rng.uniform(-0.18, 0.18)),
        iris=_color(rng, _IRIS[rng.integers(len(_IRIS))], 10.0),
        iris_radius=float(rng.uniform(1.8, 2.8)),
        brow_gap=float(rng.uniform(5.5, 10)),
        brow_thickness=float(rng.uniform(1.4, 3.6)),
        brow_length=float(rng.uniform(11, 18)),
        brow_arch=float(rng.uniform(0.5, 4.5)),
        brow_color=_color(rng, hair_base * rng.uniform(0.5, 0.95), 8.0),
        nose_offset=float(rng.uniform(-3, 4)),
        nose_width=float(rng.uniform(4.5, 9)),
        nose_bridge=float(rng.uniform(2.5, 6)),
        mouth_offset=(float(rng.uniform(-3.5, 3.5)), float(rng.uniform(-3, 3))),
        lip_thickness=(float(rng.uniform(1.3, 3.5)), float(rng.uniform(1.8, 4.5))),
        lip_color=_color(rng, np.array(skin) * np.array([0.85, 0.6, 0.62]), 10.0),
        mouth_curve=float(rng.uniform(-1.8, 1.8)),
        waves=waves,
        moles=moles,
        beard=float(rng.uniform(0.35, 0.85)) if rng.random() < 0.2 else 0.0,
        glasses=_color(rng, np.full(3, rng.uniform(10, 160)), 20.0) if has_glasses else None,
    )


def blend_family(family: Person, own: Person) -> Person:
    """Pull an individual's numeric traits towards their family's; keep discrete ones."""
    theirs = _traits(family, _NUMERIC_TRAITS)
    mine = _traits(own, _NUMERIC_TRAITS)
    return replace(own, **_trait_fields(own, _NUMERIC_TRAITS,
                                        theirs + INDIVIDUALITY * (mine - theirs)))


# Whether someone wears a beard is who they are; drifting it would grow faint beards.
_DRIFTING_TRAITS = tuple(name for name in _NUMERIC_TRAITS if name != "beard")


@lru_cache(maxsize=1)
def _drift_sigma() -> np.ndarray:
    """Per-photo drift of each drifting trait (flattened): a share of its population spread."""
    people = [sample_person(np.random.default_rng([0x5B8E, k])) for k in range(400)]
    share = [np.full(np.size(getattr(people[0], name)),
                     _COLOR_DRIFT if name in _COLOR_TRAITS else SHOT_DRIFT)
             for name in _DRIFTING_TRAITS]
    return np.std([_traits(p, _DRIFTING_TRAITS) for p in people], axis=0) * np.hstack(share)


def drift_person(person: Person, rng: np.random.Generator) -> Person:
    """How this person looks in one photo: every numeric trait nudged a little."""
    sigma = _drift_sigma()
    moved = _traits(person, _DRIFTING_TRAITS) + rng.normal(0.0, 1.0, sigma.shape) * sigma
    phases = rng.normal(0.0, _WAVE_PHASE_DRIFT, len(person.waves)).tolist()
    waves = tuple((kx, ky, phase + shift, amplitude)
                  for (kx, ky, phase, amplitude), shift in zip(person.waves, phases))
    return replace(person, waves=waves, **_trait_fields(person, _DRIFTING_TRAITS, moved))


def _traits(person: Person, names: tuple[str, ...]) -> np.ndarray:
    return np.hstack([getattr(person, name) for name in names])


def _trait_fields(person: Person, names: tuple[str, ...], flat: np.ndarray
                  ) -> dict[str, object]:
    """Inverse of _traits: split a flat vector back into the named float / tuple fields."""
    values: dict[str, object] = {}
    items = flat.tolist()
    start = 0
    for name in names:
        if isinstance(getattr(person, name), float):
            values[name] = items[start]
            start += 1
        else:
            size = len(getattr(person, name))
            values[name] = tuple(items[start:start + size])
            start += size
    return values


def _quality(rng: np.random.Generator) -> tuple[str, str, float]:
    """Pick the photo's damage: about LOW_QUALITY_SHARE of shots are degraded."""
    if rng.random() >= LOW_QUALITY_SHARE:
        return "good", "", 0.0
    quality = QUALITIES[1 + rng.integers(len(QUALITIES) - 1)]
    if quality == "blur":
        return quality, "", float(rng.uniform(1.3, 3.0))
    if quality == "lowres":
        return quality, "", float(rng.uniform(0.16, 0.35))
    if quality == "noisy":
        return quality, "", float(rng.uniform(16, 30))
    return quality, ("sunglasses", "rectangle", "hand")[rng.integers(3)], 0.0


def sample_shot(rng: np.random.Generator) -> Shot:
    """Draw one photo's conditions; nothing here depends on who is in it."""
    quality, occluder, damage = _quality(rng)
    return Shot(
        roll_deg=float(np.clip(rng.normal(0, 3.5), -8, 8)),
        scale=float(rng.uniform(0.94, 1.06)),
        shift=(float(rng.uniform(-2.5, 2.5)), float(rng.uniform(-2.5, 2.5))),
        yaw=float(rng.uniform(-1, 1)),
        smile=float(rng.uniform(-1.5, 3.0)),
        mouth_open=float(rng.uniform(1, 4)) if rng.random() < 0.2 else 0.0,
        eye_open=0.15 if rng.random() < 0.05 else float(rng.uniform(0.6, 1.1)),
        brow_raise=float(rng.uniform(-1.5, 2.0)),
        light_dir=float(rng.uniform(0, 2 * np.pi)),
        light_strength=float(rng.uniform(0.0, 0.5)),
        brightness=float(rng.uniform(0.65, 1.25)),
        contrast=float(rng.uniform(0.75, 1.2)),
        cast=_color(rng, np.ones(3), 0.06),
        background=_color(rng, rng.uniform(30, 225, 3), 0.0),
        background_tilt=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 80))),
        clothing=_color(rng, rng.uniform(20, 230, 3), 0.0),
        noise_sigma=float(rng.uniform(1, 5)),
        quality=quality,
        occluder=occluder,
        occluder_box=(float(rng.uniform(35, 77)), float(rng.uniform(60, 100)),
                      float(rng.uniform(14, 26)), float(rng.uniform(10, 20))),
        occluder_color=_color(rng, rng.uniform(20, 230, 3), 0.0),
        glasses_roll=float(rng.random()),
        hair_shift=float(rng.uniform(-2.5, 2.5)),
        damage=damage,
    )
