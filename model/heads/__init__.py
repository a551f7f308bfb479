"""The heads registry: ``train`` swaps attfc | fc | partialfc with ``--head``."""

from __future__ import annotations

from typing import Any

from torch import nn

from model.heads.attfc import AttFCHead
from model.heads.collective import Ranks
from model.heads.fc import FCHead
from model.heads.interface import Head, HeadOptions, HeadOutput
from model.heads.partialfc import PartialFCHead
from model.names import HEADS

# Name -> head class; keys are model/names.py's HEADS, in that order (a test checks).
HEAD_CLASSES: dict[str, type[nn.Module]] = {
    "attfc": AttFCHead,
    "fc": FCHead,
    "partialfc": PartialFCHead,
}

__all__ = ["HEADS", "HEAD_CLASSES", "Head", "HeadOptions", "HeadOutput", "Ranks", "build_head",
           "head_class"]


def head_class(name: str) -> type[nn.Module]:
    """The class behind ``name`` (its ``needs_class_images`` is known before building)."""
    if name not in HEAD_CLASSES:
        raise ValueError(f"unknown head {name!r}: expected one of {', '.join(HEADS)}")
    return HEAD_CLASSES[name]


def build_head(name: str, **options: Any) -> nn.Module:
    """A :class:`~model.heads.interface.Head` by name, from the keyword arguments of
    :class:`~model.heads.interface.HeadOptions` (each head reads the ones it uses)."""
    return head_class(name).from_options(HeadOptions(**options))
