"""One constructor for the three heads so ``train`` swaps them with ``--head``."""

from __future__ import annotations

import torch
from torch import nn

from model.attfc import AttFCHead
from model.fc import FCHead
from model.head_output import HeadOutput
from model.margins import CombinedMargin
from model.partialfc import PartialFCHead

HEADS: tuple[str, ...] = ("attfc", "fc", "partialfc")

__all__ = ["HEADS", "HeadOutput", "build_head"]


def build_head(name: str, *, num_classes: int, embedding_size: int, batch_size: int,
               margin: CombinedMargin, feature_encoder: nn.Module | None = None,
               sample_rate: float = 0.3, k: int = 2, momentum: float = 0.999,
               strategy: str = "attention", dcc_dtype: torch.dtype = torch.float32,
               chunk_size: int = 65536) -> nn.Module:
    """Build ``attfc`` | ``fc`` | ``partialfc``.

    Every head has ``needs_class_images``, ``forward(features, labels, class_images) ->
    HeadOutput`` and ``after_optimizer_step(feature_encoder)``. attfc deep-copies
    ``feature_encoder`` (pass the plain module, not a compiled/DDP wrapper) into its class
    encoder; ``chunk_size`` bounds its B×chunk logit working set.
    """
    if num_classes < 1 or embedding_size < 1 or batch_size < 1:
        raise ValueError("num_classes, embedding_size and batch_size must be >= 1")
    if name == "attfc":
        if feature_encoder is None:
            raise ValueError("the attfc head needs feature_encoder (copied into the class encoder)")
        return AttFCHead(feature_encoder, num_classes, embedding_size, batch_size, margin,
                         sample_rate=sample_rate, k=k, momentum=momentum, strategy=strategy,
                         dcc_dtype=dcc_dtype, chunk_size=chunk_size)
    if name == "fc":
        return FCHead(num_classes, embedding_size, margin)
    if name == "partialfc":
        return PartialFCHead(num_classes, embedding_size, margin, sample_rate=sample_rate)
    raise ValueError(f"unknown head {name!r}: expected one of {', '.join(HEADS)}")
