"""What every head promises ``train``: the Head protocol and its forward's return value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn


@dataclass
class HeadOutput:
    """Scalar loss plus logging stats kept as tensors (``.item()`` would sync every step)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # attfc: (α, cos(f, K_j)), both [B, k'], how each class image scored (k' = 1 for single)
    class_scores: tuple[torch.Tensor, torch.Tensor] | None = None


class Head(Protocol):
    """A classification head ``train`` can swap with ``--head``.

    ``needs_class_images`` is a class attribute, so the loader can be told before the head is
    built whether to decode k class images per sample.

    Across several ranks: a model-parallel head (fc, partialfc) holds rows ``weight_rows``
    (start, stop) of its ``weight`` [num_classes, D] (None: all of them), which ``train``
    gathers into the whole matrix for checkpoints; stats named in ``summed_stats`` are added
    over the ranks when logged, the others averaged.
    """

    needs_class_images: ClassVar[bool]

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_images: torch.Tensor | None = None) -> HeadOutput:
        """Features [B, D] of the identity images, labels [B], class images [B, k, 3, H, W]."""

    def after_optimizer_step(self, feature_encoder: nn.Module) -> None:
        """Called after each optimizer step (AttFC's momentum update, Eq. 12)."""
