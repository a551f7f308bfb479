"""What every head promises ``train``: the Head protocol, the options a head is built from,
and its forward's return value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Self, runtime_checkable

import torch
from torch import nn

from model.heads.collective import Ranks
from model.margins import Margin


@dataclass(frozen=True)
class HeadOptions:
    """Every setting a head may be built from; each head reads the ones it uses.

    attfc deep-copies ``feature_encoder`` (pass the plain module, not a compiled/DDP wrapper)
    into its class encoder, which follows it with ``class_encoder_momentum`` γ (Eq. 12);
    ``chunk_size`` bounds its B×chunk logit working set. ``ranks``: this process's place among
    several (see :mod:`model.heads.collective`); attfc's ``batch_size`` is then the global
    batch.
    """

    num_classes: int
    embedding_size: int
    batch_size: int
    margin: Margin
    feature_encoder: nn.Module | None = None
    sample_rate: float = 0.3
    k: int = 2
    class_encoder_momentum: float = 0.999
    strategy: str = "attention"
    dcc_dtype: torch.dtype = torch.float32
    chunk_size: int = 65536
    update_order: str = "paper"
    ranks: Ranks | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.embedding_size < 1 or self.batch_size < 1:
            raise ValueError("num_classes, embedding_size and batch_size must be >= 1")


@dataclass
class HeadOutput:
    """Scalar loss plus logging stats kept as tensors (``.item()`` would sync every step)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # attfc: (α, cos(f, K_j)), both [B, k'], how each class image scored (k' = 1 for single)
    class_scores: tuple[torch.Tensor, torch.Tensor] | None = None


@runtime_checkable
class Head(Protocol):
    """A classification head ``train`` can swap with ``--head``.

    ``needs_class_images`` is a class attribute, so the loader can be told before the head is
    built whether to decode k class images per sample.

    Across several ranks: a model-parallel head (fc, partialfc) holds rows ``weight_rows``
    (start, stop) of its ``weight`` [num_classes, D], which ``train`` gathers into the whole
    matrix for checkpoints; ``weight_rows`` None means every parameter is whole on every rank
    (attfc, any head on one process). Stats named in ``summed_stats`` are added over the
    ranks when logged, the others averaged.
    """

    needs_class_images: ClassVar[bool]
    summed_stats: ClassVar[tuple[str, ...]]
    num_classes: int
    weight_rows: tuple[int, int] | None

    @classmethod
    def from_options(cls, options: HeadOptions) -> Self:
        """The head built from the settings it uses."""

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_images: torch.Tensor | None = None) -> HeadOutput:
        """Features [B, D] of the identity images, labels [B], class images [B, k, 3, H, W]."""

    def after_optimizer_step(self, feature_encoder: nn.Module) -> None:
        """Called after each optimizer step (AttFC's momentum update, Eq. 12)."""

    # A step taken as several micro-batches (gradient accumulation): ``begin_step`` with the
    # whole batch's labels, then, when ``stages_features``, ``stage`` once per micro-batch with
    # its features computed without gradient, then ``forward`` once per micro-batch, then
    # ``end_step`` before the optimizer step. A single-batch step calls ``forward`` alone.
    stages_features: bool

    def begin_step(self, labels: torch.Tensor) -> None:
        """A step over this rank's whole batch (``labels`` [B]) begins."""

    def stage(self, features: torch.Tensor, labels: torch.Tensor,
              class_images: torch.Tensor | None) -> None:
        """One micro-batch's features, without gradient, before any micro-batch's loss."""

    def end_step(self) -> None:
        """Every micro-batch's forward and backward are done."""


class NoFeatureStaging:
    """The accumulation hooks of a head that needs no features before the losses: fc's as
    they stand (its step loss is the mean of the micro-batches' mean losses); partialfc
    adds one sample per step."""

    stages_features = False

    def begin_step(self, labels: torch.Tensor) -> None:
        """Nothing to prepare."""

    def stage(self, features: torch.Tensor, labels: torch.Tensor,
              class_images: torch.Tensor | None) -> None:
        raise RuntimeError(f"{type(self).__name__} does not stage features")

    def end_step(self) -> None:
        """Nothing to finish."""
