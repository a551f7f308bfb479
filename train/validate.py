"""Periodic verification accuracy on insightface ``.bin`` sets (lfw, cfp_fp, agedb_30, ...).

Uses evaluate's own protocol (flip test, 10-fold threshold) so the numbers logged during
training are the numbers ``python -m evaluate`` reports for the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch import nn

from common.cli import UserError
from evaluate.features import extract_features
from evaluate.verification import evaluate_embeddings, load_bin

log = logging.getLogger(__name__)


class Validator:
    """Holds the decoded sets (decoded once, up front) and scores a backbone on them."""

    def __init__(self, val_dir: Path, *, device: str, batch_size: int = 256) -> None:
        paths = sorted(Path(val_dir).glob("*.bin"))
        if not paths:
            raise UserError(f"--val {val_dir}: no .bin files in it")
        self.sets: dict[str, tuple[np.ndarray, np.ndarray]] = {
            path.stem: load_bin(path) for path in paths}
        self.device = device
        self.batch_size = batch_size

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """Accuracy per set and their mean; leaves the backbone in training mode."""
        results = {}
        try:
            for name, (images, issame) in self.sets.items():
                features = extract_features(backbone, images, device=self.device,
                                            batch_size=self.batch_size, desc=f"val {name}")
                results[name] = evaluate_embeddings(features, issame)["accuracy_mean"]
        finally:
            backbone.train()
        results["mean"] = float(np.mean(list(results.values())))
        log.info("validation: %s", " ".join(f"{k} {v:.4f}" for k, v in results.items()))
        return results
