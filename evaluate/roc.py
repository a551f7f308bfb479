"""ROC and TAR@FAR computed exactly as the published IJB tables were (sklearn + eval_ijbc.py).

The tables come from ``sklearn.metrics.roc_curve`` (one point per distinct score, collinear
points dropped, a leading (0, 0)) and a lookup that takes, for each target FAR, the ROC point
whose FPR is nearest; ties go to the point with the higher threshold index after eval_ijbc's
flip, i.e. the later point of the curve. Reproducing those details keeps our numbers
comparable to the tables to the last digit. sklearn itself is not a dependency.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.files import write_atomic

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
METRIC_MAX_FPR = 3 * max(FARS)  # enough curve for tar_at_far (needs >= 2 x FAR)


def roc_curve(labels: np.ndarray, scores: np.ndarray, max_fpr: float | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), descending thresholds, as sklearn's default roc_curve.

    sklearn argsorts all scores and takes second differences over every distinct value. For
    15.7M IJB-C pairs with 20k genuine ones that is slow, and unnecessary: walking down the
    thresholds, the curve's step (impostors, genuines) at a distinct value is (1, 0) unless the
    value is shared or genuine, and a point is kept only where the step changes. So we sort
    the scores once and do the rest on those few "special" values.

    ``max_fpr``: only the curve up to (at least) that FPR is built, from the highest scores
    (a partition, then a sort of that part). Its points are the full curve's points, plus a
    last point where it stops, which the full curve may have dropped as collinear.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if not positives or not negatives:
        raise ValueError("ROC needs both genuine and impostor pairs")
    genuine = scores[labels]
    needed = len(scores) if max_fpr is None else math.ceil(max_fpr * negatives) + positives
    if needed < len(scores):
        cut = np.partition(scores, len(scores) - needed)[len(scores) - needed]
        scores = scores[scores >= cut]  # whole tie groups: the curve stops at a real point
        genuine = genuine[genuine >= cut]
    ascending = np.sort(scores)
    total = len(ascending)
    same = ascending[1:] == ascending[:-1]
    first = np.flatnonzero(np.r_[True, ~same])  # first sorted position of each distinct value
    distinct = len(first)
    # value index (ascending) of each genuine pair and of each shared value
    genuine_values = np.sort(np.searchsorted(first, np.searchsorted(ascending, genuine)))
    shared = np.searchsorted(first, np.flatnonzero(same) + 1, side="right") - 1
    special = _sorted_union(genuine_values, shared)
    following = np.minimum(special + 1, distinct - 1)
    size = np.where(special + 1 < distinct, first[following], total) - first[special]
    genuine = np.searchsorted(genuine_values, special, side="right") - np.searchsorted(
        genuine_values, special)
    # walk in descending order: index i <-> value index distinct-1-i
    down = distinct - 1 - special[::-1]
    step_g, step_n = genuine[::-1], (size - genuine)[::-1]

    def step(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        where = np.minimum(np.searchsorted(down, i), len(down) - 1)
        hit = down[where] == i
        return np.where(hit, step_g[where], 0), np.where(hit, step_n[where], 1)

    candidates = _sorted_union(down, down - 1)
    candidates = candidates[(candidates >= 1) & (candidates <= distinct - 2)]
    g0, n0 = step(candidates)
    g1, n1 = step(candidates + 1)
    kept = _sorted_union(np.array([0, distinct - 1]), candidates[(g0 != g1) | (n0 != n1)])
    value = distinct - 1 - kept
    tps = len(genuine_values) - np.searchsorted(genuine_values, value)
    fps = (total - first[value]) - tps
    thresholds = ascending[first[value]]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / negatives, tps / positives, thresholds


def _sorted_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.union1d by sort and neighbour test (numpy's hash-based unique is slow at 1M+)."""
    merged = np.sort(np.concatenate([a, b]))
    return merged[np.r_[True, merged[1:] != merged[:-1]]] if len(merged) else merged


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> dict[str, float]:
    """TAR at the ROC point nearest to each FAR (eval_ijbc's rule); keys like ``"0.0001"``.

    A curve cut at ``max_fpr`` >= 2 x FAR gives the full curve's answer: (0, 0) is within
    FAR of the target, so neither the cut's extra point nor anything past it can be nearest.
    """
    result = {}
    for far in fars:
        gap = np.abs(fpr - far)
        # last index of the minimum gap == first index in eval_ijbc's flipped arrays
        index = len(gap) - 1 - int(np.argmin(gap[::-1]))
        result[far_key(far)] = float(tpr[index])
    return result


def roc_points(fpr: np.ndarray, tpr: np.ndarray, num: int = 120) -> dict[str, list[float]]:
    """The curve at ``num`` log-spaced FARs from 1e-6 to METRIC_MAX_FPR: small enough for the
    JSON, enough for ``evaluate report`` to redraw the ROC without the 15.7M pair scores, and
    the same whether or not the full curve was built for ``--plot``."""
    grid = np.logspace(-6, np.log10(METRIC_MAX_FPR), num)
    # step-function ROC: the best TAR reachable without exceeding each FAR
    index = np.searchsorted(fpr, grid, side="right") - 1
    return {"fpr": grid.tolist(), "tpr": tpr[index].tolist()}


def far_key(far: float) -> str:
    """JSON key of a FAR (ARCHITECTURE.md, JSON outputs): repr of the float (1e-06, 0.1)."""
    return repr(float(far))


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str) -> None:
    """TAR against FAR on a log axis, the way IJB ROC figures are drawn; one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for label, (fpr, tpr) in curves.items():
        keep = fpr > 0  # log axis
        axes.plot(fpr[keep], tpr[keep], label=label)
    axes.set_xscale("log")
    axes.set_xlim(1e-6, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("False accept rate (FAR)")
    axes.set_ylabel("True accept rate (TAR)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    write_atomic(Path(path), lambda file: figure.savefig(file, format=Path(path).suffix[1:],
                                                        dpi=120))
    plt.close(figure)
