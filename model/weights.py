"""Feature-encoder weights from a file: this project's ``model.pt`` or an insightface one.

Train loads ``--init`` weights with it, evaluate and the ONNX exporter load a backbone with
it; a file that does not fit the network is one line naming the first key that differs.
Which network a file holds comes from the caller, else from ``model.json`` beside it
(:mod:`common.run_folder`), else r50, insightface's usual backbone.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError, first_line
from common.run_folder import read_model_info
from model.backbones import get_model

DEFAULT_NETWORK = "r50"


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
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


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: Path | str,
                 network: str) -> None:
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
    ``network_args``), else :data:`DEFAULT_NETWORK`.
    """
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
