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
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from common.device import apply_tf32_policy, resolve_device
from common.errors import UserError, first_line
from common.files import write_atomic
from common.progress import Progress
from common.run_folder import read_model_info

log = logging.getLogger("evaluate.features")

DEFAULT_NETWORK = "r50"


def read_state_dict(path: Path | str) -> dict:
    """Tensors by key from a PyTorch weights file (our model.pt, an arcface_torch backbone.pth).

    ``weights_only=True``: a model file from the internet must not be able to run code.
    Files saved from DistributedDataParallel without ``.module`` carry a ``module.`` prefix
    on every key; it is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
        raise UserError(f"{path}: not a loadable PyTorch weights file ({first_line(error)})"
                        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state_dict, got {type(state).__name__}")
    other = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise UserError(f"{path}: key {other!r} holds {type(state[other]).__name__}, not a "
                        "tensor: a training checkpoint? save the backbone's state_dict alone")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module: nn.Module, state: dict, path: Path | str, network: str) -> None:
    """Strict load; a mismatch is one line naming the first missing or unexpected key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    for what, keys in (("missing key", missing), ("unexpected key", unexpected)):
        if keys:
            more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
            problems.append(f"{what} {keys[0]!r}{more}")
    if wrong:
        key = wrong[0]
        problems.append(f"{key!r} is {list(state[key].shape)}, network has {list(own[key].shape)}")
    if problems:
        raise UserError(f"{path}: weights do not fit network {network}: "
                        f"{'; '.join(problems)}; pass the right --network")
    module.load_state_dict(state, strict=True)


def load_backbone(model_path: Path | str, network: str | None = None,
                  device: str = "cpu") -> nn.Module:
    """The feature encoder saved by train (or an insightface-style state_dict), eval mode.

    The network comes from ``network``, else ``model.json`` beside the file (with its
    ``network_args``), else r50.
    """
    from model.backbones import get_model

    model_path = Path(model_path)
    state = read_state_dict(model_path)
    info = read_model_info(model_path)
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
    load_weights(backbone, state, model_path, name)
    return backbone.to(device).eval()


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
