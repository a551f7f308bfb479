"""Full FC baseline: a learned class centre per identity, W ∈ R^{N×D}, margin softmax (Eq. 1-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.heads.interface import HeadOutput
from model.heads.margin_ce import margin_cross_entropy
from model.margins import CombinedMargin


class FCHead(nn.Module):
    """cos(f, W) over all N classes in fp32; the baseline AttFC is measured against."""

    needs_class_images = False

    def __init__(self, num_classes: int, embedding_size: int, margin: CombinedMargin) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))
        self.margin = margin

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_images: torch.Tensor | None = None) -> HeadOutput:
        with torch.autocast(device_type=features.device.type, enabled=False):
            cos = F.linear(F.normalize(features.float(), dim=1), F.normalize(self.weight, dim=1))
            return HeadOutput(margin_cross_entropy(cos, labels, self.margin))

    def after_optimizer_step(self, feature_encoder: nn.Module) -> None:
        """Nothing to do: W is trained by the optimizer."""
