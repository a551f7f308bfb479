"""Per-image embeddings from any face model: batched, flip-tested, cacheable.

The model is this project's ``model.pt``, an insightface-style PyTorch state_dict
(``--network``) or an ONNX model (:mod:`evaluate.onnx_model`); all three go through the
same :class:`Embedder` call, so alignment, flip test and cache are one code path.

Published IJB and LFW numbers use the flip test: the feature of an image is the sum of the
features of the image and of its mirror. The sum (not a normalised mean) is what insightface's
eval scripts feed into template pooling, so we return it unnormalised.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from common.device import apply_tf32_policy, resolve_device
from common.errors import UserError
from common.files import write_atomic
from common.progress import Progress
from model.weights import load_backbone

log = logging.getLogger("evaluate.features")


class Embedder(Protocol):
    """uint8 [B,3,112,112] RGB -> float32 [B,D]; with ``flip``, plus the mirror's feature."""

    def __call__(self, batch: np.ndarray, *, flip: bool) -> np.ndarray: ...


class TorchEmbedder:
    """A PyTorch feature encoder as an :class:`Embedder` on ``device``."""

    def __init__(self, backbone: nn.Module, device: str) -> None:
        self.backbone, self.device = backbone.eval(), device
        apply_tf32_policy()

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray, *, flip: bool) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        return embed_batch(self.backbone, x, flip=flip).cpu().numpy()


def load_embedder(model_path: Path | str, *, network: str | None = None, device: str = "auto",
                  onnx_input: str = "auto") -> Embedder:
    """``.onnx`` -> onnxruntime; anything else -> PyTorch weights (model.pt, backbone.pth)."""
    model_path = Path(model_path)
    if model_path.suffix.lower() == ".onnx":
        from evaluate.onnx_model import OnnxEmbedder

        if network is not None:
            raise UserError(f"--network {network}: an ONNX model carries its network; "
                            "drop --network")
        return OnnxEmbedder(model_path, device=device, input_range=onnx_input)
    if onnx_input != "auto":
        raise UserError(f"--onnx-input {onnx_input}: {model_path} is not an .onnx model")
    device = resolve_device(device)
    return TorchEmbedder(load_backbone(model_path, network, device), device)


def extract_features(model: nn.Module | Embedder, images: np.ndarray | torch.Tensor, *,
                     device: str = "cpu", batch_size: int = 256, flip: bool = True,
                     desc: str = "features") -> np.ndarray:
    """float32 [M,D] embeddings of uint8 [M,3,112,112] RGB images (image + mirror when flip).

    ``model`` is an :class:`Embedder` or a PyTorch module (run on ``device``).
    """
    count = len(images)
    if count == 0:
        raise ValueError("no images to embed")
    embed = TorchEmbedder(model, device) if isinstance(model, nn.Module) else model
    chunks = []
    with Progress(count, desc, "img") as progress:
        for start in range(0, count, batch_size):
            batch = np.asarray(images[start:start + batch_size])
            chunks.append(embed(batch, flip=flip))
            progress.update(len(batch))
    return np.concatenate(chunks).astype(np.float32, copy=False)


def embed_batch(backbone: nn.Module, batch_uint8: torch.Tensor, *, flip: bool) -> torch.Tensor:
    """float32 [B,D] for one uint8 batch already on the backbone's device."""
    x = _normalize(batch_uint8)
    feats = backbone(x).float()
    if flip:
        feats = feats + backbone(torch.flip(x, dims=[3])).float()
    return feats


def _normalize(batch: torch.Tensor) -> torch.Tensor:
    from model.backbones import normalize_images

    return normalize_images(batch)


def cached_features(cache: Path | None, key: dict,
                    compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Reuse ``cache`` (.npy) when its sidecar ``.json`` matches ``key``, else compute and save.

    The key names what the features depend on (model file, data, flip), so a changed model
    or dataset never silently reuses stale features.
    """
    if cache is None:
        return compute()
    cache = Path(cache)
    sidecar = cache.with_suffix(".json")
    if cache.is_file() and sidecar.is_file():
        try:
            stored = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            stored = None
        if stored == key:
            log.info("using cached features %s", cache)
            return np.load(cache)
    features = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the cache first (a full disk leaves the old cache and key intact); the
    # sidecar is the commit point: gone while the features change, written last, so a crash
    # in between leaves features that no key matches (recomputed), never wrong ones.
    staged = cache.with_name(cache.name + ".new")
    write_atomic(staged, lambda file: np.save(file, features))
    sidecar.unlink(missing_ok=True)
    os.replace(staged, cache)
    write_atomic(sidecar, (json.dumps(key, indent=1) + "\n").encode())
    log.info("cached features in %s", cache)
    return features
