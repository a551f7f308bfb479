"""Template features the way insightface's eval_ijbc.py / ijb_1n.py build them, vectorised.

Per image: feature (image + mirror) times the detector score. Per media (a video, or a still)
the mean of its images, so a 300-frame video does not outweigh one photo; per template the sum
of its media; then L2 normalisation. Instead of a Python loop over 23k templates that scans
all 469k images each time, images are sorted once by (template, media) and summed with
``np.add.reduceat`` over the group boundaries. Float64 throughout, like the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.cli import UserError

COLUMN_BLOCK = 64  # float64 copies of [M, 64] at a time keep memory near the float32 input


@dataclass(frozen=True)
class TemplateFeatures:
    ids: np.ndarray  # int64 [T], sorted
    features: np.ndarray  # float64 [T,D], unit rows

    def rows(self, template_ids: np.ndarray, where: str) -> np.ndarray:
        """Row of each template id; a template with no images is a user error naming ``where``."""
        template_ids = np.asarray(template_ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, template_ids)
        rows = np.minimum(rows, len(self.ids) - 1)
        missing = self.ids[rows] != template_ids
        if missing.any():
            bad = np.unique(template_ids[missing])
            raise UserError(f"{where}: {len(bad)} template(s) have no images in the image list, "
                            f"e.g. template {int(bad[0])}")
        return rows


def pool_templates(features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                   faceness: np.ndarray | None = None) -> TemplateFeatures:
    """L2-normalised template features from per-image features (rows = images)."""
    if features.ndim != 2 or len(features) != len(templates) or len(templates) != len(medias):
        raise UserError(f"features of shape {features.shape} for {len(templates)} images")
    if faceness is not None and np.shape(faceness) != (len(features),):
        raise UserError(f"faceness of shape {np.shape(faceness)} for {len(features)} images")
    order = np.lexsort((medias, templates))  # stable: images keep their order inside a media
    t_sorted, m_sorted = templates[order], medias[order]
    new_media = np.ones(len(order), dtype=bool)
    new_media[1:] = (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])
    media_starts = np.flatnonzero(new_media)
    media_sizes = np.diff(np.append(media_starts, len(order))).astype(np.float64)
    media_templates = t_sorted[media_starts]
    new_template = np.ones(len(media_starts), dtype=bool)
    new_template[1:] = media_templates[1:] != media_templates[:-1]
    template_starts = np.flatnonzero(new_template)

    pooled = np.empty((len(template_starts), features.shape[1]), dtype=np.float64)
    weight = None if faceness is None else np.asarray(faceness, np.float64)[order, None]
    for c0 in range(0, features.shape[1], COLUMN_BLOCK):
        block = features[order, c0:c0 + COLUMN_BLOCK].astype(np.float64)
        if weight is not None:
            block *= weight
        media_means = np.add.reduceat(block, media_starts, axis=0) / media_sizes[:, None]
        pooled[:, c0:c0 + COLUMN_BLOCK] = np.add.reduceat(media_means, template_starts, axis=0)
    pooled /= np.sqrt(np.sum(pooled ** 2, axis=-1, keepdims=True))
    return TemplateFeatures(media_templates[template_starts], pooled)
