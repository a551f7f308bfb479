"""Feature encoders: a name -> backbone registry and the uint8 -> [-1, 1] image scaling."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from model.backbones.iresnet import iresnet
from model.backbones.mobilefacenet import MobileFaceNet
from model.names import NETWORKS

# rNN is the iResNet of depth NN; mbf is MobileFaceNet.
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    name: (MobileFaceNet if name == "mbf" else partial(iresnet, int(name[1:])))
    for name in NETWORKS}


def get_model(name: str, embedding_size: int = 512, **kwargs) -> nn.Module:
    """Backbone by name (r18|r34|r50|r100|r200|mbf): float [B,3,112,112] -> [B,embedding_size].

    Extra keyword arguments go to the constructor (``dropout`` for iresnet; ``blocks``,
    ``scale`` for mbf).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}: expected one of {', '.join(NETWORKS)}")
    return _REGISTRY[name](embedding_size=embedding_size, **kwargs)


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 RGB -> (x/255 - 0.5)/0.5 in [-1, 1], as insightface trains; keeps memory format.

    Done on the device by the model side so the loader ships 4x fewer bytes (uint8).
    """
    scaled = images.to(dtype=dtype, copy=True, memory_format=torch.preserve_format)
    return scaled.div_(127.5).sub_(1.0)  # in place on our own copy, never on the caller's
