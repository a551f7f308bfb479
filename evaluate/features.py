"""Per-image embeddings from a trained backbone: batched, flip-tested, cacheable.

Published IJB and LFW numbers use the flip test: the feature of an image is the sum of the
features of the image and of its mirror. The sum (not a normalised mean) is what insightface's
eval scripts feed into template pooling, so we return it unnormalised.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from common.progress import Progress

log = logging.getLogger("evaluate.features")

DEFAULT_NETWORK = "r50"


def _model_info(model_path: Path) -> dict:
    """``model.json`` written by train next to ``model.pt`` (network, embedding_size)."""
    info_path = model_path.parent / "model.json"
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{info_path}: invalid JSON ({error})") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_path}: expected a JSON object")
    return info


def load_backbone(model_path: Path | str, network: str | None = None,
                  device: str = "cpu") -> nn.Module:
    """The feature encoder saved by train (or an insightface model-zoo state_dict), eval mode.

    ``weights_only=True``: a model file from the internet must not be able to run code.
    The network comes from ``network``, else ``model.json`` beside the file (with its
    ``network_args``), else r50.
    """
    from model.backbones import get_model

    model_path = Path(model_path)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
        raise UserError(f"{model_path}: not a loadable weights file ({error})") from None
    if not isinstance(state, dict):
        raise UserError(f"{model_path}: expected a state_dict, got {type(state).__name__}")
    # Checkpoints saved from DistributedDataParallel carry a "module." prefix on every key.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    info = _model_info(model_path)
    name = network or info.get("network") or DEFAULT_NETWORK
    # Extra constructor arguments (e.g. a slim mbf) belong to the network model.json names.
    network_args = info.get("network_args", {}) if name == info.get("network") else {}
    embedding_size = info.get("embedding_size")
    if embedding_size is None and "features.weight" in state:  # iresnet's final BatchNorm1d
        embedding_size = int(state["features.weight"].shape[0])
    try:
        backbone = get_model(name, embedding_size=int(embedding_size or 512), **network_args)
    except (KeyError, ValueError) as error:
        raise UserError(f"--network {name}: {error}") from None
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])
        raise UserError(f"{model_path}: weights do not fit network {name} ({detail}); "
                        "pass the right --network") from None
    return backbone.to(device).eval()


def _normalize(batch: torch.Tensor) -> torch.Tensor:
    from model.backbones import normalize_images

    return normalize_images(batch)


@torch.inference_mode()
def extract_features(backbone: nn.Module, images: np.ndarray | torch.Tensor, *, device: str,
                     batch_size: int = 256, flip: bool = True,
                     desc: str = "features") -> np.ndarray:
    """float32 [M,D] embeddings of uint8 [M,3,112,112] RGB images (image + mirror when flip)."""
    count = len(images)
    if count == 0:
        raise ValueError("no images to embed")
    backbone.eval()
    chunks = []
    with Progress(count, desc, "img") as progress:
        for start in range(0, count, batch_size):
            batch = torch.as_tensor(images[start:start + batch_size]).to(device, non_blocking=True)
            chunks.append(embed_batch(backbone, batch, flip=flip).cpu().numpy())
            progress.update(len(batch))
    return np.concatenate(chunks).astype(np.float32, copy=False)


def embed_batch(backbone: nn.Module, batch_uint8: torch.Tensor, *, flip: bool) -> torch.Tensor:
    """float32 [B,D] for one uint8 batch already on the backbone's device."""
    x = _normalize(batch_uint8)
    feats = backbone(x).float()
    if flip:
        feats = feats + backbone(torch.flip(x, dims=[3])).float()
    return feats


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
    tmp = cache.with_name(cache.name + ".tmp.npy")
    np.save(tmp, features)
    tmp.replace(cache)
    sidecar.write_text(json.dumps(key, indent=1) + "\n")
    log.info("cached features in %s", cache)
    return features
