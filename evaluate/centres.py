"""One centre per training identity: the mean of its photos' unit embeddings.

Computed after training by the run's final model (or any model the evaluation reads),
every image once through the training loader (flip test, so the loader's random mirror does
not matter). Accumulating during
training would cost no extra pass but would not be exact: each image is embedded once per
epoch by a different model, so such a centre averages the weights of a whole epoch, and an
AttFC run embeds class images with its momentum encoder, not the model it saves. The extra
pass is forward only: about two thirds of an epoch's forward work with the flip.

The running sums are saved every ``save_every_s`` seconds with the next step, so a killed
pass resumes where it stopped; the key (model file and time, the shards' fingerprint, the
flip) decides whether saved sums may be reused.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import write_atomic
from common.progress import Progress

log = logging.getLogger("evaluate.centres")


@dataclass(frozen=True)
class Centres:
    """Per label: the sum of its images' unit embeddings and how many there were."""

    sums: np.ndarray  # float32 [N,D]
    counts: np.ndarray  # int64 [N]

    def unit(self) -> np.ndarray:
        """float32 [N,D] unit centres (cosine between two = inner product)."""
        norms = np.linalg.norm(self.sums, axis=1, keepdims=True)
        return (self.sums / np.maximum(norms, 1e-12)).astype(np.float32)


def cache_key(model_path: Path, shards_fingerprint: str, flip: bool) -> dict:
    model_path = Path(model_path).resolve()
    return {"model": str(model_path), "model_mtime_ns": model_path.stat().st_mtime_ns,
            "shards_fingerprint": shards_fingerprint, "flip": flip}


def _load_state(cache: Path, key: dict) -> tuple[Centres, int] | None:
    """(sums so far, next step) saved for ``key``, else None (absent, other key, damaged)."""
    try:
        with np.load(cache, allow_pickle=False) as data:
            if json.loads(str(data["key"])) != key:
                return None
            return Centres(data["sums"], data["counts"]), int(data["next_step"])
    except (OSError, ValueError, KeyError):
        return None


def _save_state(cache: Path, key: dict, centres: Centres, next_step: int) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, sums=centres.sums, counts=centres.counts, next_step=next_step,
             key=np.array(json.dumps(key, sort_keys=True)))
    write_atomic(cache, buffer.getvalue())


def identity_centres(embed, model_path: Path, shards_dir: Path, cache: Path, *,
                     batch_size: int = 256, workers: int | None = None, flip: bool = True,
                     save_every_s: float = 60.0) -> Centres:
    """Centres of every identity of ``shards_dir`` by ``embed`` (an
    :class:`evaluate.features.Embedder` of ``model_path``), resumed from ``cache``.

    The loader decodes on the CPU and the embedder moves each batch to its own device, so
    any model the evaluation reads (PyTorch or ONNX) works.
    """
    from data_engine.loading.loader import build_loader
    from data_engine.loading.reader import ShardReader

    reader = ShardReader(shards_dir)
    key = cache_key(model_path, str(reader.manifest.get("fingerprint", "")), flip)
    saved = _load_state(cache, key)
    if saved is not None and saved[1] < 0:
        log.info("using cached identity centres %s", cache)
        return saved[0]
    loader = build_loader(shards_dir, batch_size, 0, seed=0, drop_last=False, backend="torch",
                          device="cpu", workers=workers, start_step=saved[1] if saved else 0)
    sums = saved[0].sums.copy() if saved else None
    counts = saved[0].counts.copy() if saved else np.zeros(reader.num_identities, np.int64)
    step = loader.start_step
    last_save = time.monotonic()
    with loader, Progress(reader.num_images, "identity centres", "img") as progress:
        progress.update(int(counts.sum()))
        for batch in loader:
            features = np.asarray(embed(batch.identity.numpy(), flip=flip), np.float64)
            unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True),
                                         1e-12)
            if sums is None:
                sums = np.zeros((reader.num_identities, unit.shape[1]), np.float32)
            labels = batch.labels.numpy()
            np.add.at(sums, labels, unit.astype(np.float32))
            np.add.at(counts, labels, 1)
            step += 1
            progress.update(len(labels))
            if time.monotonic() - last_save >= save_every_s and step < len(loader):
                _save_state(cache, key, Centres(sums, counts), step)
                last_save = time.monotonic()
    if sums is None or int(counts.sum()) != reader.num_images:
        raise UserError(f"{shards_dir}: the loader gave {int(counts.sum())} of "
                        f"{reader.num_images} images")
    centres = Centres(sums, counts)
    _save_state(cache, key, centres, -1)  # -1: complete
    log.info("identity centres of %d identities saved in %s", len(counts), cache)
    return centres
