"""Feature encoders: a name -> backbone registry and the uint8 -> [-1, 1] image scaling."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from model.backbones.iresnet import iresnet
from model.backbones.mobilefacenet import MobileFaceNet
from model.names import NETWORKS

# Name -> constructor taking ``embedding_size`` and the network's own keyword arguments;
# its keys are model/names.py's NETWORKS, in that order (a test checks).
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "r18": partial(iresnet, 18),
    "r34": partial(iresnet, 34),
    "r50": partial(iresnet, 50),
    "r100": partial(iresnet, 100),
    "r200": partial(iresnet, 200),
    "mbf": MobileFaceNet,
}


def get_model(name: str, embedding_size: int = 512, **kwargs) -> nn.Module:
    """Backbone by name (r18|r34|r50|r100|r200|mbf): float [B,3,112,112] -> [B,embedding_size].

    Extra keyword arguments go to the constructor (``dropout`` for iresnet; ``blocks``,
    ``scale`` for mbf).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown network {name!r}: expected one of {', '.join(NETWORKS)}")
    return BACKBONES[name](embedding_size=embedding_size, **kwargs)


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 RGB -> (x/255 - 0.5)/0.5 in [-1, 1], as insightface trains; keeps memory format.

    Done on the device by the model side so the loader ships 4x fewer bytes (uint8), and
    straight into the compute ``dtype`` (no fp32 copy for autocast to cast). In bf16/fp16,
    x − 127.5 is exact, so each value is the fp32 result rounded once, as autocast rounds it.
    """
    scaled = images.to(dtype=dtype, copy=True, memory_format=torch.preserve_format)
    if dtype in (torch.bfloat16, torch.float16):  # in place on our own copy, never the caller's
        return scaled.sub_(127.5).div_(127.5)
    return scaled.div_(127.5).sub_(1.0)
