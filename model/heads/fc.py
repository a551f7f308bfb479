"""Full FC baseline: a learned class centre per identity, W ∈ R^{N×D}, margin softmax (Eq. 1-2).

On several ranks W is split by class range (model parallel, :mod:`model.heads.collective`):
each rank keeps its rows, scores every rank's features against them, and the softmax is
assembled across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.heads.collective import (
    Ranks,
    all_gather,
    class_range,
    gather_features,
    sharded_margin_cross_entropy,
)
from model.heads.interface import HeadOptions, HeadOutput, NoFeatureStaging
from model.heads.margin_ce import margin_cross_entropy, margin_head_output, sample_norms
from model.margins import Margin
from model.precision import at_least_fp32


class FCHead(NoFeatureStaging, nn.Module):
    """cos(f, W) over all N classes in fp32; the baseline AttFC is measured against."""

    needs_class_images = False
    summed_stats = ()

    def __init__(self, num_classes: int, embedding_size: int, margin: Margin,
                 ranks: Ranks | None = None) -> None:
        super().__init__()
        weight, self.ranks, self.weight_rows = split_classes(
            torch.normal(0.0, 0.01, (num_classes, embedding_size)), ranks)
        self.weight = nn.Parameter(weight)
        self.num_classes = num_classes
        self.margin = margin

    @classmethod
    def from_options(cls, options: HeadOptions) -> FCHead:
        return cls(options.num_classes, options.embedding_size, options.margin,
                   ranks=options.ranks)

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_images: torch.Tensor | None = None) -> HeadOutput:
        if self.ranks is not None:
            return self._forward_sharded(features, labels)
        norms, _ = sample_norms(self.margin, features)
        with torch.autocast(device_type=features.device.type, enabled=False):
            cos = F.linear(F.normalize(at_least_fp32(features), dim=1),
                           F.normalize(self.weight, dim=1))
            loss = margin_cross_entropy(cos, labels, self.margin, norms)
        return margin_head_output(loss, self.margin, norms)

    def _forward_sharded(self, features: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """The global batch's loss over this rank's class rows; the same value on every rank
        (plus the margin's own terms over this rank's samples)."""
        norms, norms_all = sample_norms(self.margin, features, self.ranks)
        with torch.autocast(device_type=features.device.type, enabled=False):
            f_all = gather_features(F.normalize(at_least_fp32(features), dim=1), self.ranks)
            labels_all = all_gather(labels, self.ranks)
            start, stop = self.weight_rows
            cos = F.linear(f_all, F.normalize(self.weight, dim=1))
            target = torch.where((labels_all >= start) & (labels_all < stop),
                                 labels_all - start, -1)
            loss = sharded_margin_cross_entropy(cos, target, self.margin, self.ranks, norms_all)
        return margin_head_output(loss, self.margin, norms)

    def after_optimizer_step(self, feature_encoder: nn.Module) -> None:
        """Nothing to do: W is trained by the optimizer."""


def split_classes(weight: torch.Tensor, ranks: Ranks | None
                  ) -> tuple[torch.Tensor, Ranks | None, tuple[int, int] | None]:
    """(this rank's rows of ``weight``, the ranks, the row range), or the whole matrix and
    two Nones on one process.

    Every rank draws the whole initial matrix from the same seed and keeps its rows, so the
    split run starts from exactly the weights one process starts from (the full draw is
    transient host memory, N·D floats).
    """
    if ranks is None or ranks.world_size == 1:
        return weight, None, None
    if weight.shape[0] < ranks.world_size:
        raise ValueError(f"{weight.shape[0]} classes cannot be split over "
                         f"{ranks.world_size} ranks")
    start, stop = class_range(weight.shape[0], ranks.rank, ranks.world_size)
    return weight[start:stop].clone(), ranks, (start, stop)
