"""Evaluation sets as unit vectors to match training identities against (``--against``).

An insightface ``.bin`` gives one vector per image; an IJB-B/C root one per template
(pooled as the IJB protocol pools them), with its subject id, which on synthetic data names
the person. A folder may hold several of either.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from evaluate import ijb_meta


@dataclass
class EvalSet:
    """One evaluation set's items: unit features, a caption and a picture of each."""

    name: str
    path: Path
    features: np.ndarray  # float32 [M,D] unit rows
    items: list[str]  # "image 17", "template 4 (subject 100003)"
    subjects: np.ndarray | None  # int64 [M] subject ids (IJB), None for .bin
    picture: Callable[[int], np.ndarray]  # item -> uint8 HWC RGB


def _ijb_prefix(root: Path) -> str | None:
    for prefix in ijb_meta.GALLERIES:
        if ijb_meta.meta_path(root, prefix, "face_tid_mid.txt").is_file():
            return prefix
    return None


def find_eval_sets(paths: list[Path]) -> list[tuple[str, Path]]:
    """(kind, path) of every .bin file and IJB root named, or directly inside a named folder."""
    found: list[tuple[str, Path]] = []
    for path in paths:
        path = Path(path)
        if path.is_file() and path.suffix == ".bin":
            found.append(("bin", path))
        elif path.is_dir() and _ijb_prefix(path):
            found.append(("ijb", path))
        elif path.is_dir():
            inside = [("bin", p) for p in sorted(path.glob("*.bin"))]
            inside += [("ijb", p) for p in sorted(path.iterdir()) if p.is_dir() and _ijb_prefix(p)]
            if not inside:
                raise UserError(f"--against {path}: no .bin file and no IJB root (meta/ with "
                                "ijbc_ or ijbb_ lists) in it")
            found += inside
        else:
            raise UserError(f"--against {path}: not a .bin file or a folder")
    return found


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def bin_set(path: Path, embed, *, batch_size: int, flip: bool) -> EvalSet:
    """Every image of an insightface .bin (both images of every pair)."""
    from evaluate.features import extract_features
    from evaluate.verification import load_bin

    images, _ = load_bin(path)
    features = extract_features(embed, images, batch_size=batch_size, flip=flip,
                                desc=f"{path.name} features")
    return EvalSet(path.stem, path, _unit(features), [f"image {i}" for i in range(len(images))],
                   None, lambda i: images[i].transpose(1, 2, 0))


def ijb_set(root: Path, embed, *, batch_size: int, flip: bool, workers: int) -> EvalSet:
    """Every template of an IJB root, pooled with detector scores as the protocol does."""
    from evaluate import ijb
    from evaluate.templates import pool_templates

    prefix = _ijb_prefix(root)
    images = ijb_meta.read_image_meta(root, prefix)
    landmarks = ijb_meta.read_landmarks(root, prefix, images.names)
    features = ijb.model_features(root, prefix, images.names, landmarks.points, embed,
                                  batch_size=batch_size, flip=flip, workers=workers)
    pooled = pool_templates(features, images.templates, images.medias, landmarks.scores)
    subject_of: dict[int, int] = {}
    for search_set in ijb_meta.read_one_to_n(root, prefix):
        subject_of.update(zip(search_set.templates.tolist(), search_set.subjects.tolist()))
    subjects = np.array([subject_of.get(int(t), -1) for t in pooled.ids], np.int64)
    first_image = {}
    for name, template in zip(images.names, images.templates.tolist()):
        first_image.setdefault(template, name)

    def picture(i: int) -> np.ndarray:
        from PIL import Image

        path = root / "loose_crop" / first_image[int(pooled.ids[i])]
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            return np.asarray(image.convert("RGB"))

    items = [f"template {int(t)} (subject {int(s)})" for t, s in zip(pooled.ids, subjects)]
    return EvalSet(f"{root.name}:{prefix}", root, _unit(pooled.features), items, subjects,
                   picture)


def load_eval_sets(paths: list[Path], embed, *, batch_size: int, flip: bool,
                   workers: int) -> list[EvalSet]:
    return [bin_set(path, embed, batch_size=batch_size, flip=flip) if kind == "bin"
            else ijb_set(path, embed, batch_size=batch_size, flip=flip, workers=workers)
            for kind, path in find_eval_sets(paths)]
