"""1:1 scores for template pairs: cosine similarity of unit template features.

IJB-C lists 15.7M pairs, but they connect only a few thousand enrolment templates with the
probe templates. Gathering two 512-d float64 rows per pair moves ~130 GB of memory; instead,
when the pairs are dense enough, we multiply blocks of the distinct left templates against all
distinct right templates (BLAS) and pick the listed pairs from each block. Sparse pair lists
fall back to gathering in chunks. Memory stays under ``block_bytes`` either way.
"""

from __future__ import annotations

import numpy as np

from common.progress import Progress

DENSE_FACTOR = 64  # a matmul entry costs far less than a gathered pair: dense wins up to this


def pair_scores(features: np.ndarray, rows1: np.ndarray, rows2: np.ndarray,
                block_bytes: int = 256 << 20) -> np.ndarray:
    """float64 [P] dot products ``features[rows1[i]] . features[rows2[i]]``."""
    left, left_index = np.unique(rows1, return_inverse=True)
    right, right_index = np.unique(rows2, return_inverse=True)
    scores = np.empty(len(rows1), dtype=np.float64)
    if len(left) * len(right) <= DENSE_FACTOR * len(rows1):
        _dense(features, left, left_index, right, right_index, scores, block_bytes)
    else:
        _gathered(features, rows1, rows2, scores, block_bytes)
    return scores


def _dense(features, left, left_index, right, right_index, scores, block_bytes) -> None:
    right_features = np.ascontiguousarray(features[right])
    block = max(1, block_bytes // (8 * len(right)))
    order = np.argsort(left_index, kind="stable")
    bounds = np.searchsorted(left_index[order], np.arange(0, len(left) + block, block))
    with Progress(len(scores), "1:1 pair scores", "pair") as progress:
        for b, start in enumerate(range(0, len(left), block)):
            similarity = features[left[start:start + block]] @ right_features.T
            chosen = order[bounds[b]:bounds[b + 1]]
            scores[chosen] = similarity[left_index[chosen] - start, right_index[chosen]]
            progress.update(len(chosen))


def _gathered(features, rows1, rows2, scores, block_bytes) -> None:
    chunk = max(1, block_bytes // (16 * features.shape[1]))
    with Progress(len(scores), "1:1 pair scores", "pair") as progress:
        for start in range(0, len(scores), chunk):
            a = features[rows1[start:start + chunk]]
            b = features[rows2[start:start + chunk]]
            scores[start:start + chunk] = np.einsum("ij,ij->i", a, b)
            progress.update(len(a))
