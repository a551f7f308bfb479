"""Periodic verification accuracy on insightface ``.bin`` sets (lfw, cfp_fp, agedb_30, ...).

Uses evaluate's own protocol (flip test, 10-fold threshold) so the numbers logged during
training are the numbers ``python -m evaluate`` reports for the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch import nn

from common.errors import UserError
from common.run_folder import VAL_DIR
from data_engine.layout import read_manifest
from evaluate.features import extract_features
from evaluate.synthetic_ijb import write_synthetic_bin
from evaluate.verification import evaluate_embeddings, load_bin

log = logging.getLogger(__name__)


def synthetic_heldout(shards_dir: Path, run_dir: Path, *, identities: int = 300,
                      pairs: int = 600) -> Path | None:
    """For synthetic shards, RUN/val with a .bin of people the run never trains on.

    Synthetic identity ``i`` looks the same whatever else is generated, so identities from
    the training set's count upwards are unseen people: a real held-out test. None for
    other sources (pass their lfw/cfp_fp/agedb_30 .bin files with --val).
    """
    manifest = read_manifest(shards_dir)
    if manifest.get("source") != "synthetic":
        return None
    info = manifest.get("source_info", {})
    val_dir = run_dir / VAL_DIR
    path = val_dir / "synthetic_heldout.bin"
    if not path.is_file():
        val_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # not *.bin until complete
        write_synthetic_bin(partial, identities=identities,
                            first_identity=int(info.get("identities", manifest["num_identities"])),
                            pairs=pairs, seed=int(info.get("seed", 0)))
        partial.replace(path)
    return val_dir


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
