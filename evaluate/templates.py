"""Template features the way insightface's eval_ijbc.py / ijb_1n.py build them, vectorised.

Per image: feature (image + mirror) times the detector score. Per media (a video, or a still)
the mean of its images, so a 300-frame video does not outweigh one photo; per template the sum
of its media; then L2 normalisation. Written as one weighted sum per template,
``sum_i faceness_i / |media(i)| * f_i``, it needs no loop over 23k templates: the image
rows are grouped by template (a stable sort of 470k row numbers, not of the 1 GB feature
matrix), and all templates with the same number of images are summed at once as a
[templates, images, D] block, gathered, weighted and reduced by numpy -- a pass over the
features with reused buffers, and no torch (the ``--features`` path starts without it).
Float64 throughout, like the reference (the summation order differs, so values agree to
~1e-16, not bit for bit).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from common.errors import UserError

CHUNK_ROWS = 32768  # float64 scratch of CHUNK_ROWS x D, reused for every chunk
MAX_LOOKUP_ID = 50_000_000  # template ids up to this use a lookup table, else a binary search


@dataclass(frozen=True)
class TemplateFeatures:
    ids: np.ndarray  # int64 [T], sorted
    features: np.ndarray  # float64 [T,D], unit rows

    def rows(self, template_ids: np.ndarray, where: str) -> np.ndarray:
        """Row of each template id; a template with no images is a user error naming ``where``."""
        template_ids = np.asarray(template_ids, dtype=np.int64)
        if len(self.ids) and self.ids[0] >= 0 and self.ids[-1] <= MAX_LOOKUP_ID \
                and template_ids.min(initial=0) >= 0:
            lookup = np.full(max(int(self.ids[-1]), int(template_ids.max(initial=0))) + 1, -1)
            lookup[self.ids] = np.arange(len(self.ids))
            rows = lookup[template_ids]
            missing = rows < 0
        else:
            rows = np.minimum(np.searchsorted(self.ids, template_ids), len(self.ids) - 1)
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
    template_ids, template_rows = np.unique(templates, return_inverse=True)
    # media are counted per (template, media): the same media id may appear in two templates
    media_ids, media_rows = np.unique(medias, return_inverse=True)
    _, media_group, media_sizes = np.unique(template_rows * len(media_ids) + media_rows,
                                            return_inverse=True, return_counts=True)
    weights = 1.0 / media_sizes[media_group]
    if faceness is not None:
        weights = weights * np.asarray(faceness, np.float64)
    # images grouped by template (stable: within a template, in file order); templates of
    # one size are summed together as a [templates, size, D] block, CHUNK_ROWS rows at a time
    order = np.argsort(template_rows, kind="stable")
    sizes = np.bincount(template_rows, minlength=len(template_ids))
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    dim = features.shape[1]
    pooled = np.empty((len(template_ids), dim), dtype=np.float64)
    rows = min(len(features), max(CHUNK_ROWS, int(sizes.max())))
    scratch = np.empty(rows * dim, np.float64)  # both reused for every block
    gathered = np.empty(rows * dim, features.dtype)
    by_size = np.argsort(sizes, kind="stable")
    bounds = np.r_[0, np.flatnonzero(np.diff(sizes[by_size])) + 1, len(by_size)]
    for first, last in itertools.pairwise(bounds.tolist()):
        size = int(sizes[by_size[first]])
        step = max(1, CHUNK_ROWS // size)
        for lo in range(first, last, step):
            group = by_size[lo:min(lo + step, last)]
            images = order[starts[group, None] + np.arange(size)].reshape(-1)
            block = scratch[:len(images) * dim].reshape(len(group), size, dim)
            rows_in = gathered[:len(images) * dim].reshape(len(images), dim)
            np.take(features, images, axis=0, out=rows_in)  # float32 rows, also from a memmap
            np.multiply(rows_in.reshape(block.shape), weights[images].reshape(
                len(group), size, 1), out=block)
            pooled[group] = block.sum(axis=1)
    pooled /= np.sqrt(np.square(pooled).sum(axis=1, keepdims=True))
    return TemplateFeatures(template_ids, pooled)
