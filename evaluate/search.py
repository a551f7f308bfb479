"""1:N identification through faiss, with the metrics of insightface's ijb_1n.py.

Closed-set (the published tables): gallery = G1 ∪ G2 (one template per subject), every mixed
probe has its mate there. top-k = the mate is among the k best gallery scores. TPIR@FPIR f:
the threshold is the ⌈f·Q⌉-th largest non-mate score over all probe × gallery pairs, and TPIR
is the fraction of probes whose mate scores above it (rank is ignored, as in ijb_1n.py).

Open-set (``open_set_metrics``, stricter, labelled as such in the output): G1 and G2 are
searched separately; probes whose subject is not enrolled are non-mated searches; FPIR counts
non-mated probes whose best score passes the threshold, and a mated probe counts only with
its mate at rank 1 and above the threshold.

faiss ranks in float32; the scores that decide a metric are recomputed in float64 so the
numbers equal the float64 reference. The non-mate threshold needs the globally largest
⌈f·Q⌉ non-mate scores: each probe's top-k is fetched and k grows only for probes whose
k-th score still reaches the running threshold, so memory stays ~Q·k, not Q·gallery.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from common.errors import UserError

log = logging.getLogger("evaluate.search")

FPIRS = (0.01, 0.1)
TOP_K = (1, 5, 10)
GPU_MAX_K = 2048
EPS = 1e-4  # far above float32 dot-product error for unit vectors, far below score gaps
ADD_CHUNK = 100_000


def faiss_gpu(device: str, num_gpus: int) -> int | None:
    """The GPU faiss searches on for ``--device`` (None: the CPU index), given how many GPUs
    faiss sees: ``cuda:N`` is GPU N, as for the network; ``auto``/``cuda`` GPU 0 when there
    is one; ``cpu`` never a GPU. A faiss built without GPUs searches on the CPU."""
    number = device.removeprefix("cuda:")
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:")
                                                      and number.isdigit()):
        raise UserError(f"--device {device}: expected auto, cpu or cuda[:N]")
    if device == "cpu" or num_gpus == 0:
        return None
    if device in ("auto", "cuda"):
        return 0
    if int(number) >= num_gpus:
        raise UserError(f"--device {device}: faiss sees {num_gpus} GPU(s)")
    return int(number)


class Gallery:
    """Unit gallery vectors (templates, then optional distractors) behind a faiss IndexFlatIP,
    copied to the GPU :func:`faiss_gpu` picks for ``device``."""

    def __init__(self, templates: np.ndarray, distractors: np.ndarray | None = None,
                 device: str = "auto") -> None:
        import faiss

        self.templates = np.asarray(templates, np.float64)
        self.distractors = distractors
        dim = self.templates.shape[1]
        if distractors is not None and (distractors.ndim != 2 or distractors.shape[1] != dim):
            raise UserError(f"distractors of shape {distractors.shape} do not match "
                            f"{dim}-d template features")
        self.cpu_index = faiss.IndexFlatIP(dim)
        self.cpu_index.add(self.templates.astype(np.float32))
        if distractors is not None:
            for start in range(0, len(distractors), ADD_CHUNK):  # memmap: bounded memory
                self.cpu_index.add(_unit(distractors[start:start + ADD_CHUNK]).astype(np.float32))
        self.size = self.cpu_index.ntotal
        self.gpu_index = None
        gpu = faiss_gpu(device, faiss.get_num_gpus())
        if gpu is not None:
            self._resources = faiss.StandardGpuResources()
            self.gpu_index = faiss.index_cpu_to_gpu(self._resources, gpu, self.cpu_index)
            log.info("faiss search on GPU %d (%d gallery vectors)", gpu, self.size)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.size)
        index = self.gpu_index if self.gpu_index is not None and k <= GPU_MAX_K \
            else self.cpu_index
        return index.search(np.ascontiguousarray(queries, np.float32), k)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """float64 rows for gallery ids (templates first, then distractors)."""
        ids = np.asarray(ids)
        if self.distractors is None:
            return np.take(self.templates, ids, axis=0)
        out = np.empty((*ids.shape, self.templates.shape[1]), np.float64)
        own = ids < len(self.templates)
        out[own] = self.templates[ids[own]]
        if not own.all():
            extra = ids[~own] - len(self.templates)
            order = np.argsort(extra)  # sorted reads from a memmap
            rows = np.empty((len(extra), out.shape[-1]), np.float64)
            rows[order] = _unit(np.asarray(self.distractors[extra[order]]))
            out[~own] = rows
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _exact(gallery: Gallery, probes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 scores probe i · gallery ids[i, j] (ids of -1 give -inf)."""
    out = np.full(ids.shape, -np.inf)
    chunk = max(1, (64 << 20) // (8 * probes.shape[1] * max(1, ids.shape[1])))
    for start in range(0, len(ids), chunk):
        block = ids[start:start + chunk]
        valid = block >= 0
        vectors = gallery.vectors(np.where(valid, block, 0))
        scores = np.matmul(vectors, probes[start:start + chunk, :, None])[..., 0]
        out[start:start + chunk] = np.where(valid, scores, -np.inf)
    return out


def mates(probe_subjects: np.ndarray, gallery_subjects: np.ndarray, where: str) -> np.ndarray:
    """Gallery row of each probe's subject, -1 when not enrolled; duplicates are an error."""
    unique, counts = np.unique(gallery_subjects, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"{where}: subject {int(unique[counts > 1][0])} has "
                        f"{int(counts[counts > 1][0])} gallery templates (expected one)")
    order = np.argsort(gallery_subjects)
    pos = np.minimum(np.searchsorted(gallery_subjects[order], probe_subjects), len(order) - 1)
    found = gallery_subjects[order][pos] == probe_subjects
    return np.where(found, order[pos], -1)


def _ranks(gallery: Gallery, probes: np.ndarray, mate: np.ndarray, k: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mate score, non-mates scoring above it among the top k, top-k ids, exact top-k)."""
    _, ids = gallery.search(probes, k)
    exact = _exact(gallery, probes, ids)
    positive = np.einsum("qd,qd->q", probes, gallery.vectors(mate))
    above = ((exact > positive[:, None]) & (ids != mate[:, None])).sum(axis=1)
    return positive, above, ids, exact


def _largest_non_mate_scores(gallery: Gallery, probes: np.ndarray, mate: np.ndarray,
                             ids: np.ndarray, exact: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest non-mate scores over all probes x gallery, float64, descending."""
    rows = np.arange(len(probes))
    k = ids.shape[1]
    candidates = []  # (exact scores) of rows whose whole tail above threshold we hold
    while True:
        non_mate = np.where(ids != mate[:, None], exact, -np.inf)
        pooled = np.concatenate([*candidates, non_mate[non_mate > -np.inf]])
        threshold = np.partition(pooled, len(pooled) - count)[len(pooled) - count] \
            if len(pooled) >= count else -np.inf
        incomplete = (exact[:, -1] >= threshold - EPS) & (k < gallery.size)
        candidates.append(non_mate[~incomplete][non_mate[~incomplete] >= threshold - EPS])
        if not incomplete.any():
            break
        rows, k = rows[incomplete], min(4 * k, gallery.size)
        _, ids = gallery.search(probes[rows], k)
        exact = _exact(gallery, probes[rows], ids)
        mate = mate[incomplete]
    scores = np.concatenate(candidates)
    if len(scores) < count:
        raise UserError(f"only {len(scores)} non-mate scores for a threshold needing {count}")
    return -np.sort(-scores)[:count]


@dataclass(frozen=True)
class Identification:
    top: dict[int, float]
    tpir_at_fpir: dict[str, float]
    thresholds: dict[str, float]


def closed_set_metrics(gallery: Gallery, probes: np.ndarray, mate: np.ndarray) -> Identification:
    """ijb_1n.py's top-1/5/10 and TPIR@FPIR over gallery G1 ∪ G2 (+ distractors)."""
    probes = np.asarray(probes, np.float64)
    positive, above, ids, exact = _ranks(gallery, probes, mate, max(TOP_K) + 1)
    top = {r: float(np.mean(above < r)) for r in TOP_K}
    need = [math.ceil(len(probes) * f) for f in FPIRS]
    largest = _largest_non_mate_scores(gallery, probes, mate, ids, exact, max(need))
    tpir, thresholds = {}, {}
    for fpir, n in zip(FPIRS, need):
        threshold = float(largest[n - 1])
        thresholds[repr(fpir)] = threshold
        tpir[repr(fpir)] = float(np.mean(positive > threshold))
    return Identification(top, tpir, thresholds)


def open_set_metrics(gallery: Gallery, probes: np.ndarray, mate: np.ndarray) -> dict:
    """Stricter open-set numbers for one gallery: mated probes need rank 1 above threshold."""
    probes = np.asarray(probes, np.float64)
    mated = mate >= 0
    if not mated.any() or mated.all():
        raise UserError("open-set search needs both enrolled and non-enrolled probe subjects")
    _, ids = gallery.search(probes, 2)
    exact = _exact(gallery, probes, ids)
    best = exact.max(axis=1)
    positive, above, _, _ = _ranks(gallery, probes[mated], mate[mated], 2)
    rank1 = above == 0
    non_mated_best = -np.sort(-best[~mated])
    result = {"top1": float(rank1.mean()), "tpir_at_fpir": {}, "num_mated": int(mated.sum()),
              "num_non_mated": int((~mated).sum())}
    for fpir in FPIRS:
        threshold = non_mated_best[max(1, math.ceil(fpir * len(non_mated_best))) - 1]
        result["tpir_at_fpir"][repr(fpir)] = float(np.mean(rank1 & (positive > threshold)))
    return result
