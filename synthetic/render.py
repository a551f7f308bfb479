"""Vectorised drawing of a synthetic face onto a canvas, in the canonical template frame.

Every pixel of the output knows its canonical (template) coordinates through one affine
map, so the same drawing code serves aligned 112x112 crops and loose, rotated, scaled
crops, and the 5 landmarks stay exactly where the features are drawn. Each feature only
touches the pixels inside its bounding window, which keeps a 112x112 face near 1-2 ms.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from synthetic.params import Person, Shot

TEMPLATE_CENTER = (56.0, 60.0)
_YAW_SHIFT = np.array([3.0, 3.0, 5.0, 3.0, 3.0])  # how far each landmark moves per unit yaw

Window = tuple[slice, slice]
_NOISE_POOL_SIZE = 1 << 20  # more than one 260x260 RGB canvas


def unit_clip(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place; np.clip's Python wrapper costs more than the maths here."""
    return np.minimum(np.maximum(values, 0.0, out=values), 1.0, out=values)


class Canvas:
    """An RGB float image plus, for each pixel, its canonical coordinates."""

    def __init__(self, width: int, height: int, to_image: np.ndarray) -> None:
        self.to_image = to_image.astype(np.float64)
        self.to_canonical = np.linalg.inv(np.vstack([self.to_image, [0.0, 0.0, 1.0]]))[:2]
        self.cols = np.arange(width, dtype=np.float32)
        self.rows = np.arange(height, dtype=np.float32)[:, None]
        (a, b, c), (d, e, f) = self.to_canonical
        self.X = a * self.cols + b * self.rows + np.float32(c)
        self.Y = d * self.cols + e * self.rows + np.float32(f)
        # Channel-first, so every blend runs over contiguous rows instead of RGB triples.
        self.image = np.empty((3, height, width), np.float32)
        self.px_per_unit = float(np.sqrt(abs(np.linalg.det(self.to_image[:, :2]))))
        self._reach = float(np.linalg.norm(self.to_image[:, :2], 2))

    def window(self, cx: float, cy: float, radius: float) -> Window:
        """Output pixels that can see the canonical disc (cx, cy, radius)."""
        px, py = self.to_image @ np.array([cx, cy, 1.0])
        r = radius * self._reach + 1.0
        h, w = self.X.shape
        rows = slice(min(h, max(0, int(py - r))), min(h, max(0, int(py + r) + 2)))
        cols = slice(min(w, max(0, int(px - r))), min(w, max(0, int(px + r) + 2)))
        return rows, cols

    def grid(self, win: Window) -> tuple[np.ndarray, np.ndarray]:
        """Canonical x and y of the pixels in a window."""
        return self.X[win], self.Y[win]

    def edge(self, signed_distance: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage (one output pixel of ramp) from a signed distance in canonical
        units, negative inside."""
        return unit_clip(0.5 - signed_distance * self.px_per_unit)

    def linear(self, kx: float, ky: float, offset: float,
               win: Window = (slice(None), slice(None))) -> np.ndarray:
        """kx*X + ky*Y + offset over a window, from 1-D pieces (one full-size op)."""
        (a, b, c), (d, e, f) = self.to_canonical
        return ((kx * a + ky * d) * self.cols[win[1]]
                + ((kx * b + ky * e) * self.rows[win[0]] + (kx * c + ky * f + offset)))

    def waves(self, win: Window, waves: tuple[tuple[float, float, float, float], ...]
              ) -> np.ndarray:
        """Sum of a*cos(kx*X + ky*Y + phase) over a window.

        Each wave is separable in (row, column), cos(r + c) = cos r cos c - sin r sin c, so
        the sum is one small matrix product of per-row and per-column factors.
        """
        (a, b, c), (d, e, f) = self.to_canonical
        kx, ky, phase, amplitude = (np.array(v, np.float32)[:, None] for v in zip(*waves))
        col = (kx * a + ky * d) * self.cols[win[1]]
        row = (kx * b + ky * e) * self.rows[win[0]].T + (kx * c + ky * f + phase)
        rows = np.vstack([amplitude * np.cos(row), -amplitude * np.sin(row)])
        return rows.T @ np.vstack([np.cos(col), np.sin(col)])

    def paint(self, win: Window, alpha: np.ndarray, color: object) -> None:
        """Blend a colour (RGB triple, or per-pixel [3,h,w]) over the window with coverage alpha."""
        region = self.image[:, win[0], win[1]]
        color = np.asarray(color, np.float32)
        if color.ndim == 1:
            color = color[:, None, None]
        change = color - region
        change *= alpha
        region += change

    def ellipse(self, win: Window, cx: float, cy: float, ax: float, ay: float,
                angle: float = 0.0) -> np.ndarray:
        """Coverage of a (rotated) ellipse over a window.

        Uses r^2 - 1 ~ 2 (r - 1) near the rim for the signed distance: no square root, and
        the normalised coordinates come straight from the affine map as 1-D pieces.
        """
        c, s = np.cos(angle), np.sin(angle)
        u = self.linear(c / ax, s / ax, -(cx * c + cy * s) / ax, win)
        v = self.linear(-s / ay, c / ay, (cx * s - cy * c) / ay, win)
        u *= u
        v *= v
        u += v
        k = 0.5 * min(ax, ay) * self.px_per_unit
        u *= -k
        u += k + 0.5
        return unit_clip(u)


def feature_points(person: Person, shot: Shot) -> np.ndarray:
    """Canonical 5 landmarks of this person in this shot (before the pose transform)."""
    ex, ey = person.eye_offset
    mx, my = person.mouth_offset
    lift = 0.35 * shot.smile
    points = np.array([
        [38.2946 - ex, 51.6963 + ey],
        [73.5318 + ex, 51.5014 + ey],
        [56.0252, 71.7366 + person.nose_offset],
        [41.5493 - mx - 0.4 * shot.smile, 92.3655 + my - lift],
        [70.7299 + mx + 0.4 * shot.smile, 92.2041 + my - lift],
    ])
    points[:, 0] += shot.yaw * _YAW_SHIFT
    return points


def paint_face(canvas: Canvas, person: Person, shot: Shot, points: np.ndarray) -> None:
    """Draw background, body, head and inner features, back to front."""
    _paint_background(canvas, shot)
    _paint_body(canvas, person, shot)
    face_x = TEMPLATE_CENTER[0] - 1.5 * shot.yaw
    if not person.bald:
        _paint_hair_back(canvas, person, face_x)
    _paint_ears(canvas, person, face_x, points)
    _paint_head(canvas, person, shot, face_x, points)
    for side, eye in ((-1.0, points[0]), (1.0, points[1])):
        _paint_brow(canvas, person, shot, side, eye)
        _paint_eye(canvas, person, shot, side, eye)
    _paint_nose(canvas, person, points)
    _paint_mouth(canvas, person, shot, points)
    glasses = _glasses(person, shot)
    if glasses is not None:
        _paint_glasses(canvas, person, points, glasses, filled=False)
    _paint_occluder(canvas, person, shot, points)


def _glasses(person: Person, shot: Shot) -> object | None:
    """Frame colour if glasses are worn in this shot: mostly, not always, by their owners."""
    if person.glasses is not None:
        return person.glasses if shot.glasses_roll < 0.8 else None
    return shot.occluder_color if shot.glasses_roll > 0.96 else None


def _paint_background(canvas: Canvas, shot: Shot) -> None:
    direction, amount = shot.background_tilt
    kx, ky = amount * np.cos(direction) / 112.0, amount * np.sin(direction) / 112.0
    canvas.image[:] = canvas.linear(kx, ky, -56.0 * (kx + ky))
    canvas.image += np.asarray(shot.background, np.float32)[:, None, None]


def _paint_body(canvas: Canvas, person: Person, shot: Shot) -> None:
    win = canvas.window(56.0, 150.0, 75.0)
    canvas.paint(win, canvas.ellipse(win, 56.0, 150.0, 72.0, 40.0), shot.clothing)
    neck = canvas.window(56.0, 108.0, 26.0)
    neck_color = np.asarray(person.skin) * 0.78
    canvas.paint(neck, canvas.ellipse(neck, 56.0, 108.0, person.face_ax * 0.55, 25.0), neck_color)


def _paint_hair_back(canvas: Canvas, person: Person, face_x: float) -> None:
    ax = person.face_ax + person.hair_volume
    ay = person.face_ay + 0.8 * person.hair_volume
    cy = person.face_center_y - 4.0
    win = canvas.window(face_x, cy, max(ax, ay))
    canvas.paint(win, canvas.ellipse(win, face_x, cy, ax, ay), person.hair)
    if person.long_hair:
        win = canvas.window(face_x, cy + 30.0, max(ax, ay))
        canvas.paint(win, canvas.ellipse(win, face_x, cy + 30.0, ax + 2.0, ay * 0.85), person.hair)


def _paint_ears(canvas: Canvas, person: Person, face_x: float, points: np.ndarray) -> None:
    ear_y = 0.5 * (points[0, 1] + points[1, 1]) + 7.0
    ax, ay = person.ear_size
    color = np.asarray(person.skin) * 0.9
    for side in (-1.0, 1.0):
        cx = face_x + side * (person.face_ax - 1.0)
        win = canvas.window(cx, ear_y, ay)
        canvas.paint(win, canvas.ellipse(win, cx, ear_y, ax, ay), color)


def _head_coverage(canvas: Canvas, person: Person, face_x: float, win: Window
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Head coverage with an identity-specific jaw taper, and the normalised radius."""
    X, Y = canvas.grid(win)
    cy, ay = person.face_center_y, person.face_ay
    below = unit_clip((Y - cy) / ay)
    ax = person.face_ax * (1.0 - (1.0 - person.jaw) * below * below)
    u = (X - face_x) / ax
    v = (Y - cy) / ay
    r = np.sqrt(u * u + v * v)
    return canvas.edge((r - 1.0) * person.face_ax), r


def _paint_head(canvas: Canvas, person: Person, shot: Shot, face_x: float,
                points: np.ndarray) -> None:
    win = canvas.window(face_x, person.face_center_y, max(person.face_ax, person.face_ay) + 2)
    alpha, r = _head_coverage(canvas, person, face_x, win)
    X, Y = canvas.grid(win)
    tone = canvas.waves(win, person.waves)
    tone += 1.0 - 0.2 * r * r
    canvas.paint(win, alpha, tone * np.asarray(person.skin, np.float32)[:, None, None])
    for mx, my, radius in person.moles:
        mole = canvas.window(mx, my, radius)
        canvas.paint(mole, canvas.ellipse(mole, mx, my, radius, radius),
                     np.asarray(person.skin) * 0.45)
    if person.beard:
        top = 0.5 * (points[3, 1] + points[4, 1]) - 7.0
        beard = alpha * person.beard * unit_clip((Y - top) / 3.0)
        canvas.paint(win, beard, np.asarray(person.hair) * 0.85)
    if not person.bald:
        hairline = person.hairline_y + shot.hair_shift + person.hairline_curve * (X - face_x) ** 2
        canvas.paint(win, alpha * canvas.edge(Y - hairline), person.hair)


def _paint_brow(canvas: Canvas, person: Person, shot: Shot, side: float,
                eye: np.ndarray) -> None:
    half = 0.5 * person.brow_length
    bx = eye[0] + 1.5 * side
    by = eye[1] - person.brow_gap - shot.brow_raise
    win = canvas.window(bx, by - person.brow_arch, half + 4.0)
    X, Y = canvas.grid(win)
    t = (X - bx) / half
    center = by - person.brow_arch * (1.0 - t * t)
    thickness = person.brow_thickness * (1.0 - 0.35 * t * side)
    alpha = canvas.edge(np.abs(Y - center) - 0.5 * thickness)
    alpha *= canvas.edge((np.abs(t) - 1.0) * half)
    canvas.paint(win, alpha, person.brow_color)


def _paint_eye(canvas: Canvas, person: Person, shot: Shot, side: float,
               eye: np.ndarray) -> None:
    ax, ay = person.eye_size
    ay *= shot.eye_open
    angle = -side * person.eye_tilt
    win = canvas.window(eye[0], eye[1], ax + 2.0)
    sclera = canvas.ellipse(win, eye[0], eye[1], ax, ay, angle)
    canvas.paint(win, sclera, (236.0, 232.0, 226.0))
    ix = eye[0] + 0.8 * shot.yaw
    iris = sclera * canvas.ellipse(win, ix, eye[1], person.iris_radius, person.iris_radius)
    canvas.paint(win, iris, person.iris)
    pupil_r = 0.45 * person.iris_radius
    canvas.paint(win, sclera * canvas.ellipse(win, ix, eye[1], pupil_r, pupil_r), (15, 12, 12))
    rim = canvas.ellipse(win, eye[0], eye[1] - 0.3, ax + 0.8, ay + 0.9, angle) - sclera
    lash = unit_clip(rim) * (canvas.Y[win] < eye[1] + 0.3 * ay)
    canvas.paint(win, lash, (30, 22, 20))


def _paint_nose(canvas: Canvas, person: Person, points: np.ndarray) -> None:
    nx, ny = points[2]
    eye_y = 0.5 * (points[0, 1] + points[1, 1])
    skin = np.asarray(person.skin)
    length = 0.5 * (ny - eye_y)
    win = canvas.window(nx, eye_y + length, length + person.nose_width)
    X, Y = canvas.grid(win)
    along = unit_clip(1.0 - np.abs(Y - (eye_y + length)) / length)
    shadow = along * canvas.edge(np.abs(X - nx - 0.6 * person.nose_bridge)
                                 - 0.5 * person.nose_bridge)
    canvas.paint(win, 0.45 * shadow, skin * 0.8)
    w = 0.5 * person.nose_width
    canvas.paint(win, 0.5 * canvas.ellipse(win, nx, ny - 1.0, w, 0.7 * w), skin * 1.08)
    for side in (-1.0, 1.0):
        nostril = canvas.ellipse(win, nx + side * 0.55 * w, ny + 1.5, 1.5, 0.9)
        canvas.paint(win, nostril, skin * 0.35)


def _paint_mouth(canvas: Canvas, person: Person, shot: Shot, points: np.ndarray) -> None:
    left, right = points[3], points[4]
    half = 0.5 * (right[0] - left[0])
    mx, my = 0.5 * (left + right)
    bend = person.mouth_curve + shot.smile
    win = canvas.window(mx, my, half + 8.0)
    X, Y = canvas.grid(win)
    t = (X - mx) / half
    body = unit_clip(1.0 - t * t)
    center = left[1] + (right[1] - left[1]) * 0.5 * (t + 1.0) + bend * body
    gap = 0.5 * shot.mouth_open * body
    upper, lower = person.lip_thickness
    top = center - gap - upper * np.sqrt(body)
    bottom = center + gap + lower * np.sqrt(body)
    inside = np.abs(t) < 1.0
    lips = canvas.edge(np.maximum(top - Y, Y - bottom)) * inside
    canvas.paint(win, lips, person.lip_color)
    seam = canvas.edge(np.abs(Y - center) - np.maximum(gap, 0.35)) * inside
    canvas.paint(win, seam, (55.0, 25.0, 28.0))


def _paint_glasses(canvas: Canvas, person: Person, points: np.ndarray, color: object,
                   filled: bool) -> None:
    """Spectacle frames (identity) or dark sunglasses (an occluder) around both eyes."""
    ax, ay = person.eye_size[0] + 4.5, 6.5
    for eye in points[:2]:
        win = canvas.window(eye[0], eye[1], ax + 1.5)
        outer = canvas.ellipse(win, eye[0], eye[1], ax + 0.8, ay + 0.8)
        inner = canvas.ellipse(win, eye[0], eye[1], ax - 0.4, ay - 0.4)
        canvas.paint(win, outer if filled else unit_clip(outer - inner), color)
    (lx, ly), (rx, ry) = points[0], points[1]
    win = canvas.window(0.5 * (lx + rx), 0.5 * (ly + ry), 0.5 * (rx - lx))
    X, Y = canvas.grid(win)
    bridge = canvas.edge(np.abs(Y - 0.5 * (ly + ry) + 1.5) - 0.8)
    bridge *= canvas.edge(np.abs(X - 0.5 * (lx + rx)) - 0.5 * (rx - lx))
    canvas.paint(win, bridge, color)


def _paint_occluder(canvas: Canvas, person: Person, shot: Shot, points: np.ndarray) -> None:
    if shot.occluder == "sunglasses":
        _paint_glasses(canvas, person, points, (18.0, 18.0, 22.0), filled=True)
        return
    cx, cy, hw, hh = shot.occluder_box
    win = canvas.window(cx, cy, np.hypot(hw, hh))
    if shot.occluder == "hand":
        canvas.paint(win, canvas.ellipse(win, cx, cy, hw, hh, 0.4), np.asarray(person.skin) * 0.95)
    elif shot.occluder == "rectangle":
        X, Y = canvas.grid(win)
        box = canvas.edge(np.maximum(np.abs(X - cx) - hw, np.abs(Y - cy) - hh))
        canvas.paint(win, box, shot.occluder_color)


def finish(canvas: Canvas, shot: Shot, rng: np.random.Generator) -> np.ndarray:
    """Light the scene, apply the shot's damage and sensor noise; return uint8 HWC RGB."""
    image = _light(canvas, shot)
    if shot.quality == "blur":
        radius = shot.damage * canvas.px_per_unit
        blurred = Image.fromarray(_to_pixels(image)).filter(ImageFilter.GaussianBlur(radius))
        image = np.asarray(blurred, np.float32).transpose(2, 0, 1)
    elif shot.quality == "lowres":
        image = _low_resolution(_to_pixels(image), shot.damage / canvas.px_per_unit)
    sigma = shot.damage if shot.quality == "noisy" else shot.noise_sigma
    image += _sensor_noise(image.shape, rng) * np.float32(sigma)
    return _to_pixels(image)


@lru_cache(maxsize=1)
def _noise_pool() -> np.ndarray:
    """Fixed Gaussian samples: a random window of them costs a copy, fresh draws cost ~5x."""
    return np.random.default_rng(0x901).standard_normal(_NOISE_POOL_SIZE, dtype=np.float32)


def _sensor_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Unit Gaussian noise of the given shape, a window of the pool chosen by rng."""
    size = int(np.prod(shape))
    start = int(rng.integers(0, _NOISE_POOL_SIZE - size))
    return _noise_pool()[start:start + size].reshape(shape)


def _light(canvas: Canvas, shot: Shot) -> np.ndarray:
    """Directional light, exposure, white balance and contrast, in place on the canvas."""
    cx, cy = TEMPLATE_CENTER
    kx, ky = np.cos(shot.light_dir) / 56.0, np.sin(shot.light_dir) / 56.0
    ramp = np.clip(canvas.linear(kx, ky, -(kx * cx + ky * cy)), -1.5, 1.5)
    image = canvas.image
    image *= shot.brightness * (1.0 + shot.light_strength * ramp)
    image *= (shot.contrast * np.asarray(shot.cast, np.float32))[:, None, None]
    image += 128.0 * (1.0 - shot.contrast)
    return image


def _to_pixels(image: np.ndarray) -> np.ndarray:
    """Channel-first float -> contiguous HWC uint8, in one pass after clipping."""
    np.clip(image, 0.0, 255.0, out=image)
    return np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.uint8)


def _low_resolution(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Down- then up-sample, as a small face upscaled by a detector would look."""
    h, w = pixels.shape[:2]
    small = (max(6, round(w * factor)), max(6, round(h * factor)))
    image = Image.fromarray(pixels).resize(small, Image.BILINEAR)
    return np.asarray(image.resize((w, h), Image.BILINEAR), np.float32).transpose(2, 0, 1)
