"""Partial FC baseline on one GPU: every step uses all positive centres of the batch plus
uniformly sampled negatives, r·N rows in total (An et al. 2022).

W is one ``nn.Parameter``; the sampled rows are gathered with ``index_select`` so only they get
a non-zero gradient. The gradient tensor is still dense [N, D], and SGD's weight decay and
momentum still touch every row (as in insightface's Partial FC with a dense parameter).

On several ranks W is split by class range as in :mod:`model.heads.fc`. Every rank draws the
same sample (the same RNG, the all-gathered labels as positives) and uses the sampled rows
of its own range: per-shard sampling that keeps every positive and is, row for row, the
sample one process with the global batch draws. Picking this rank's rows out of the sample
is data-dependent in size, so the split path waits for the host once per step; the
one-process path has fixed shapes throughout and never does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.heads.collective import (
    Ranks,
    all_gather,
    gather_features,
    sharded_margin_cross_entropy,
)
from model.heads.fc import split_classes
from model.heads.interface import HeadOptions, HeadOutput, NoFeatureStaging
from model.heads.margin_ce import margin_cross_entropy, margin_head_output, sample_norms
from model.margins import Margin
from model.precision import at_least_fp32


class PartialFCHead(NoFeatureStaging, nn.Module):
    """Margin softmax over a sampled subset of class centres (positives always kept)."""

    needs_class_images = False
    summed_stats = ()

    def __init__(self, num_classes: int, embedding_size: int, margin: Margin,
                 sample_rate: float = 0.3, ranks: Ranks | None = None) -> None:
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        weight, self.ranks, self.weight_rows = split_classes(
            torch.normal(0.0, 0.01, (num_classes, embedding_size)), ranks)
        self.weight = nn.Parameter(weight)
        self.num_classes = num_classes
        self.margin = margin
        self.num_sample = max(1, int(sample_rate * num_classes))
        self._step_labels: torch.Tensor | None = None  # the whole batch's, in an accumulated step
        self._step_index: torch.Tensor | None = None  # its sample, drawn at the first forward

    @classmethod
    def from_options(cls, options: HeadOptions) -> PartialFCHead:
        return cls(options.num_classes, options.embedding_size, options.margin,
                   sample_rate=options.sample_rate, ranks=options.ranks)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted class ids to use [M] and each label's row in them.

        Positives get score 2 and negatives U(0, 1), so top-M keeps every positive and fills
        the rest uniformly at random (global torch RNG, saved by train's checkpoints). M is
        fixed by the shapes alone, max(r·N, min(B, N)), so the step never waits for the host
        to learn a size; when B > r·N, the slots past max(r·N, #positives) in score order
        are -1 (unused), so exactly max(r·N, #positives) classes take part.
        """
        num_classes = self.num_classes
        if self.num_sample >= num_classes:
            return torch.arange(num_classes, device=labels.device), labels
        score = torch.rand(num_classes, device=labels.device).index_fill_(0, labels, 2.0)
        count = max(self.num_sample, min(labels.numel(), num_classes))
        if count == self.num_sample:  # r·N ≥ B: every positive fits, every slot is used
            index = torch.topk(score, count, sorted=False).indices
        else:
            top, index = torch.topk(score, count)
            used = (top == 2.0).sum().clamp(min=self.num_sample)
            index = torch.where(torch.arange(count, device=labels.device) < used, index, -1)
        index = index.sort().values
        return index, torch.searchsorted(index, labels)

    def begin_step(self, labels: torch.Tensor) -> None:
        """Every micro-batch of this step shares one sample, drawn from the whole batch's
        positives (as the single-batch step draws it)."""
        self._step_labels, self._step_index = labels, None

    def end_step(self) -> None:
        self._step_labels = self._step_index = None

    def _index(self, labels: torch.Tensor) -> torch.Tensor:
        """The sample for a forward over ``labels`` (all ranks' on several): its own, or the
        step's, drawn once from the whole batch's labels."""
        if self._step_labels is None:
            return self.sample(labels)[0]
        if self._step_index is None:
            step_labels = (self._step_labels if self.ranks is None
                           else all_gather(self._step_labels, self.ranks))
            self._step_index = self.sample(step_labels)[0]
        return self._step_index

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_images: torch.Tensor | None = None) -> HeadOutput:
        if self.ranks is not None:
            return self._forward_sharded(features, labels)
        index = self._index(labels)
        local = torch.searchsorted(index, labels)
        norms, _ = sample_norms(self.margin, features)
        with torch.autocast(device_type=features.device.type, enabled=False):
            weight = F.normalize(self.weight.index_select(0, index.clamp(min=0)), dim=1)
            cos = F.linear(F.normalize(at_least_fp32(features), dim=1), weight)
            if index.numel() > self.num_sample:  # unused slots take no probability
                cos = torch.where(index >= 0, cos, float("-inf"))
            loss = margin_cross_entropy(cos, local, self.margin, norms)
        return margin_head_output(loss, self.margin, norms)

    def _forward_sharded(self, features: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """The global batch's loss over the sampled rows in this rank's class range (plus
        the margin's own terms over this rank's samples)."""
        labels_all = all_gather(labels, self.ranks)
        index = self._index(labels_all)
        start, stop = self.weight_rows
        with torch.no_grad():
            mine = index[(index >= start) & (index < stop)] - start
            here = (labels_all >= start) & (labels_all < stop)
            target = torch.where(here, torch.searchsorted(mine, labels_all - start), -1)
        norms, norms_all = sample_norms(self.margin, features, self.ranks)
        with torch.autocast(device_type=features.device.type, enabled=False):
            f_all = gather_features(F.normalize(at_least_fp32(features), dim=1), self.ranks)
            weight = F.normalize(self.weight.index_select(0, mine), dim=1)
            cos = F.linear(f_all, weight)
            loss = sharded_margin_cross_entropy(cos, target, self.margin, self.ranks, norms_all)
        return margin_head_output(loss, self.margin, norms)

    def after_optimizer_step(self, feature_encoder: nn.Module) -> None:
        """Nothing to do: W is trained by the optimizer."""
