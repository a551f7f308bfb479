"""The heads registry: one constructor so ``train`` swaps attfc | fc | partialfc with ``--head``."""

from __future__ import annotations

import torch
from torch import nn

from model.heads.attfc import AttFCHead
from model.heads.collective import Ranks
from model.heads.fc import FCHead
from model.heads.interface import Head, HeadOutput
from model.heads.partialfc import PartialFCHead
from model.margins import CombinedMargin
from model.names import HEADS

_CLASSES: dict[str, type[nn.Module]] = dict(zip(HEADS, (AttFCHead, FCHead, PartialFCHead),
                                                strict=True))

__all__ = ["HEADS", "Head", "HeadOutput", "Ranks", "build_head", "head_class"]


def head_class(name: str) -> type[nn.Module]:
    """The class behind ``name`` (its ``needs_class_images`` is known before building)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown head {name!r}: expected one of {', '.join(HEADS)}")
    return _CLASSES[name]


def build_head(name: str, *, num_classes: int, embedding_size: int, batch_size: int,
               margin: CombinedMargin, feature_encoder: nn.Module | None = None,
               sample_rate: float = 0.3, k: int = 2, momentum: float = 0.999,
               strategy: str = "attention", dcc_dtype: torch.dtype = torch.float32,
               chunk_size: int = 65536, update_order: str = "paper",
               ranks: Ranks | None = None) -> nn.Module:
    """Build a :class:`~model.heads.interface.Head` by name.

    attfc deep-copies ``feature_encoder`` (pass the plain module, not a compiled/DDP wrapper)
    into its class encoder; ``chunk_size`` bounds its B×chunk logit working set. The other
    heads ignore the attfc-only options. ``ranks``: this process's place among several (see
    :mod:`model.heads.collective`); attfc's ``batch_size`` is then the global batch.
    """
    cls = head_class(name)
    if num_classes < 1 or embedding_size < 1 or batch_size < 1:
        raise ValueError("num_classes, embedding_size and batch_size must be >= 1")
    if cls is AttFCHead:
        if feature_encoder is None:
            raise ValueError("the attfc head needs feature_encoder (copied into the class encoder)")
        return AttFCHead(feature_encoder, num_classes, embedding_size, batch_size, margin,
                         sample_rate=sample_rate, k=k, momentum=momentum, strategy=strategy,
                         dcc_dtype=dcc_dtype, chunk_size=chunk_size,
                         update_order=update_order, ranks=ranks)
    if cls is FCHead:
        return FCHead(num_classes, embedding_size, margin, ranks=ranks)
    return PartialFCHead(num_classes, embedding_size, margin, sample_rate=sample_rate,
                         ranks=ranks)
