"""ROC and TAR@FAR computed exactly as the published IJB tables were (sklearn + eval_ijbc.py).

The tables come from ``sklearn.metrics.roc_curve`` (one point per distinct score, collinear
points dropped, a leading (0, 0)) and a lookup that takes, for each target FAR, the ROC point
whose FPR is nearest; ties go to the point with the higher threshold index after eval_ijbc's
flip, i.e. the later point of the curve. Reproducing those details keeps our numbers
comparable to the tables to the last digit. sklearn itself is not a dependency.
"""

from __future__ import annotations

import numpy as np

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """(fpr, tpr, thresholds), descending thresholds, as sklearn's default roc_curve."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        raise ValueError("ROC needs both genuine and impostor pairs")
    order = np.argsort(scores, kind="stable")[::-1]
    scores, labels = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels, dtype=np.int64)[last_of_value]
    fps = last_of_value + 1 - tps
    thresholds = scores[last_of_value]
    if len(fps) > 2:  # drop points in the middle of straight segments
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> dict[str, float]:
    """TAR at the ROC point nearest to each FAR (eval_ijbc's rule); keys like ``"0.0001"``."""
    result = {}
    for far in fars:
        gap = np.abs(fpr - far)
        # last index of the minimum gap == first index in eval_ijbc's flipped arrays
        index = len(gap) - 1 - int(np.argmin(gap[::-1]))
        result[far_key(far)] = float(tpr[index])
    return result


def far_key(far: float) -> str:
    """JSON key of a FAR as in DESIGN §5: Python's repr of the float (1e-06, 0.0001, 0.1)."""
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
    figure.savefig(path, dpi=120)
    plt.close(figure)
