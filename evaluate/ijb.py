"""IJB-B/IJB-C end to end: aligned features from loose crops, then 1:1 and 1:N metrics."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.progress import Progress
from evaluate import ijb_meta
from evaluate.align import align_face
from evaluate.pairs import pair_scores
from evaluate.roc import METRIC_MAX_FPR, roc_curve, tar_at_far
from evaluate.search import Gallery, closed_set_metrics, mates, open_set_metrics
from evaluate.templates import TemplateFeatures, pool_templates

CHUNK_IMAGES = 2048  # aligned faces held at once: 2048 x 37 KB


def _load_aligned(root: Path, name: str, landmarks: np.ndarray, where: str) -> np.ndarray:
    from PIL import Image

    path = Path(root) / "loose_crop" / name
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing (listed at {where})") from None
    except OSError as error:
        raise UserError(f"{path}: cannot decode ({error})") from None
    return align_face(pixels, landmarks, where=f"{path} ({where})").transpose(2, 0, 1)


def model_features(root: Path, prefix: str, names: list[str], landmarks: np.ndarray,
                   embed: Callable[..., np.ndarray], *, batch_size: int, flip: bool,
                   workers: int) -> np.ndarray:
    """float32 [M,D] flip-test features of every aligned loose crop, in image-list order.

    ``embed`` is an ``evaluate.features.Embedder`` (PyTorch or ONNX). Decoding and warping
    run in ``workers`` threads (PIL releases the GIL for both) while the model embeds the
    previous chunk's faces.
    """
    five_points = ijb_meta.meta_path(root, prefix, "name_5pts_score.txt").name
    features = None
    with ThreadPoolExecutor(workers) as pool, Progress(len(names), f"{prefix} features",
                                                      "img") as progress:

        def submit(start: int) -> list:
            return [pool.submit(_load_aligned, root, names[i], landmarks[i],
                                f"{five_points}:{i + 1}")
                    for i in range(start, min(start + CHUNK_IMAGES, len(names)))]

        pending = submit(0)
        for start in range(0, len(names), CHUNK_IMAGES):
            faces = np.stack([future.result() for future in pending])
            pending = submit(start + CHUNK_IMAGES)  # decode the next chunk meanwhile
            for b in range(0, len(faces), batch_size):
                out = embed(faces[b:b + batch_size], flip=flip)
                if features is None:
                    features = np.empty((len(names), out.shape[1]), np.float32)
                features[start + b:start + b + len(out)] = out
                progress.update(len(out))
    return features


@dataclass
class IJBResult:
    metrics: dict  # the JSON contract (ARCHITECTURE.md)
    fpr: np.ndarray
    tpr: np.ndarray


@dataclass(frozen=True)
class Protocol:
    """The 1:1 pair list and 1:N lists, with the file names used in error messages."""

    pairs: np.ndarray  # int64 [P,2] template ids
    labels: np.ndarray  # int8 [P]
    sets: tuple[ijb_meta.SearchSet, ijb_meta.SearchSet, ijb_meta.SearchSet]
    pairs_file: str
    set_files: dict[str, str]


def read_protocol(root: Path, prefix: str) -> Protocol:
    pairs, labels = ijb_meta.read_pairs(root, prefix)
    sets = ijb_meta.read_one_to_n(root, prefix)
    return Protocol(pairs, labels, sets,
                    str(ijb_meta.meta_path(root, prefix, "template_pair_label.txt")),
                    {s.name: str(ijb_meta.meta_path(root, prefix, f"1N_{s.name}.csv"))
                     for s in sets})


def score(images: ijb_meta.ImageMeta, features: np.ndarray, faceness: np.ndarray | None,
          protocol: Protocol, *, distractors: np.ndarray | None = None,
          open_set: bool = False, full_roc: bool = False, device: str = "auto") -> IJBResult:
    """All metrics from per-image features, computed as insightface's eval scripts do.

    The ROC is built up to FAR 0.3 only (all the metrics need) unless ``full_roc`` (plots).
    """
    return score_templates(pool_templates(features, images.templates, images.medias, faceness),
                           protocol, distractors=distractors, open_set=open_set,
                           full_roc=full_roc, device=device)


def score_templates(pooled: TemplateFeatures, protocol: Protocol, *,
                    distractors: np.ndarray | None = None, open_set: bool = False,
                    full_roc: bool = False, device: str = "auto") -> IJBResult:
    """:func:`score` from already pooled template features; faiss searches on ``device``."""
    pairs = protocol.pairs
    scores = pair_scores(pooled.features, pooled.rows(pairs[:, 0], protocol.pairs_file),
                         pooled.rows(pairs[:, 1], protocol.pairs_file))
    fpr, tpr, _ = roc_curve(protocol.labels, scores,
                            max_fpr=None if full_roc else METRIC_MAX_FPR)
    metrics = {"tar_at_far": tar_at_far(fpr, tpr)}
    metrics.update(one_to_n(pooled, protocol, distractors, open_set, device))
    return IJBResult(metrics, fpr, tpr)


def _set_features(pooled: TemplateFeatures, search_set: ijb_meta.SearchSet, where: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Unique templates of a 1:N list (first listed subject, as ijb_1n.py) and features."""
    unique, first = np.unique(search_set.templates, return_index=True)
    return pooled.features[pooled.rows(unique, where)], search_set.subjects[first]


def one_to_n(pooled: TemplateFeatures, protocol: Protocol, distractors: np.ndarray | None,
             open_set: bool, device: str = "auto") -> dict:
    """Closed-set metrics over G1 ∪ G2 (+ distractors); open-set per gallery when asked."""
    first, second, probe = protocol.sets
    g1, g1_subjects = _set_features(pooled, first, protocol.set_files[first.name])
    g2, g2_subjects = _set_features(pooled, second, protocol.set_files[second.name])
    probes, probe_subjects = _set_features(pooled, probe, protocol.set_files[probe.name])
    gallery_subjects = np.concatenate([g1_subjects, g2_subjects])
    mate = mates(probe_subjects, gallery_subjects, "1:N galleries")
    if (mate < 0).any():
        raise UserError(f"{protocol.set_files[probe.name]}: subject "
                        f"{int(probe_subjects[mate < 0][0])} has no template in either gallery")
    closed = closed_set_metrics(Gallery(np.concatenate([g1, g2]), distractors, device),
                                probes, mate)
    metrics = {f"top{k}": v for k, v in closed.top.items()}
    metrics["tpir_at_fpir"] = closed.tpir_at_fpir
    if open_set:
        metrics["open_set"] = {
            search_set.name.removeprefix("gallery_"): open_set_metrics(
                Gallery(feats, distractors, device), probes,
                mates(probe_subjects, subjects, protocol.set_files[search_set.name]))
            for search_set, feats, subjects in ((first, g1, g1_subjects),
                                                (second, g2, g2_subjects))}
    return metrics
