"""1:1 scores for template pairs: cosine similarity of unit template features.

IJB-C lists 15.7M pairs, but they connect only a few thousand enrolment templates with the
probe templates. Gathering two 512-d float64 rows per pair moves ~130 GB of memory; instead,
when the pairs are dense enough, we multiply blocks of the distinct left templates against all
distinct right templates (BLAS) and pick the listed pairs from each block. Sparse pair lists
fall back to gathering in chunks. Memory stays near ``block_bytes`` (1 GiB) either way.
"""

from __future__ import annotations

import numpy as np

from common.progress import Progress

DENSE_FACTOR = 64  # a matmul entry costs far less than a gathered pair: dense wins up to this


def _distinct(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct rows and each element's index among them, without sorting P items."""
    present = np.zeros(size, dtype=bool)
    present[rows] = True
    distinct = np.flatnonzero(present)
    lookup = np.zeros(size, dtype=np.int64)
    lookup[distinct] = np.arange(len(distinct))
    return distinct, lookup[rows]


def pair_scores(features: np.ndarray, rows1: np.ndarray, rows2: np.ndarray,
                block_bytes: int = 1 << 30) -> np.ndarray:
    """float64 [P] dot products ``features[rows1[i]] . features[rows2[i]]``."""
    left, left_index = _distinct(rows1, len(features))
    right, right_index = _distinct(rows2, len(features))
    scores = np.empty(len(rows1), dtype=np.float64)
    if len(left) * len(right) <= DENSE_FACTOR * len(rows1):
        _dense(features, left, left_index, right, right_index, scores, block_bytes)
    else:
        _gathered(features, rows1, rows2, scores, block_bytes)
    return scores


def _dense(features, left, left_index, right, right_index, scores, block_bytes) -> None:
    right_features = np.ascontiguousarray(features[right])
    block = max(1, block_bytes // (8 * len(right)))
    buffer = np.empty((min(block, len(left)), len(right)))  # reused: no page faults per block
    with Progress(len(scores), "1:1 pair scores", "pair") as progress:
        for start in range(0, len(left), block):
            rows = features[left[start:start + block]]
            similarity = np.matmul(rows, right_features.T, out=buffer[:len(rows)]).reshape(-1)
            if len(rows) == len(left):  # one block (IJB-C: 3.5k x 19.6k): every pair
                scores[:] = np.take(similarity, left_index * len(right) + right_index)
                progress.update(len(scores))
                continue
            chosen = np.flatnonzero((left_index >= start) & (left_index < start + len(rows)))
            flat = (left_index[chosen] - start) * len(right) + right_index[chosen]
            scores[chosen] = np.take(similarity, flat)
            progress.update(len(chosen))


def _gathered(features, rows1, rows2, scores, block_bytes) -> None:
    chunk = max(1, block_bytes // (16 * features.shape[1]))
    with Progress(len(scores), "1:1 pair scores", "pair") as progress:
        for start in range(0, len(scores), chunk):
            a = features[rows1[start:start + chunk]]
            b = features[rows2[start:start + chunk]]
            scores[start:start + chunk] = np.einsum("ij,ij->i", a, b)
            progress.update(len(a))
