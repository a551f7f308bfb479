"""What the heads need across ranks: the class split, gathers, and a softmax over shards.

``train`` hands a head a :class:`Ranks` when it runs on several processes; with none (one
process) every head runs its single-process code unchanged. The FC heads are model
parallel: rank r holds the class rows :func:`class_range` gives it, sees every rank's
features (:func:`gather_features`) and labels (:func:`all_gather`), and the softmax over
all classes is assembled from all-reduced per-row maxima and sums
(:func:`sharded_margin_cross_entropy`), so no rank ever holds the full B×N logit matrix.
AttFC gathers its GCCs and labels, in rank order, into one identical container on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.margins import Margin
from model.precision import at_least_fp32


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: its rank, how many there are, and their group."""

    rank: int
    world_size: int
    group: Any = None  # a torch.distributed ProcessGroup; None: the default (every rank)


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of the class matrix that ``rank`` holds: contiguous, in rank
    order, the first ``num_classes % world_size`` ranks one row more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def all_gather(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on all) concatenated in rank order on dim 0."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(ranks.world_size)]
    dist.all_gather(parts, tensor, group=ranks.group)
    return torch.cat(parts)


class _GatherFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: torch.Tensor, ranks: Ranks) -> torch.Tensor:
        ctx.ranks = ranks
        return all_gather(features, ranks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ranks = ctx.ranks
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ranks.group)  # every shard's share of each row
        rows = grad.shape[0] // ranks.world_size
        mine = grad[ranks.rank * rows:(ranks.rank + 1) * rows]
        return mine * ranks.world_size, None


def gather_features(features: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """All ranks' features [world·B, D], differentiable.

    Each rank's loss is the loss of the whole global batch, so the gradient reaching this
    rank's features is the sum of every shard's part of it. It comes back times the world
    size because DistributedDataParallel averages the encoder's gradients over the ranks:
    the mean of those is then the sum, the gradient one process with the global batch has.
    """
    return _GatherFeatures.apply(features, ranks)


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ranks: Ranks) -> torch.Tensor:
        batch = logits.shape[0]
        row_max = (logits.detach().amax(dim=1) if logits.shape[1]
                   else logits.new_full((batch,), float("-inf")))
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=ranks.group)
        exp = (logits.detach() - row_max[:, None]).exp_()
        mine = target >= 0
        rows = torch.nonzero(mine).squeeze(1)
        sums = torch.zeros((2, batch), dtype=logits.dtype, device=logits.device)
        sums[0] = exp.sum(dim=1)
        sums[1, rows] = logits.detach()[rows, target[rows]]  # the target logit, on one rank
        dist.all_reduce(sums, group=ranks.group)
        loss = (sums[0].log() + row_max - sums[1]).mean()
        ctx.save_for_backward(exp.div_(sums[0][:, None]), target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, target = ctx.saved_tensors
        rows = torch.nonzero(target >= 0).squeeze(1)
        probs[rows, target[rows]] -= 1.0
        return probs.mul_(grad_loss / probs.shape[0]), None, None


def sharded_margin_cross_entropy(cos: torch.Tensor, target: torch.Tensor,
                                 margin: Margin, ranks: Ranks,
                                 norms: torch.Tensor | None = None) -> torch.Tensor:
    """Mean margin-softmax CE of the global batch over the classes of every rank's shard.

    cos [world·B, C_r]: cosines of all ranks' features with this rank's class rows; target
    [world·B]: each sample's column here, or −1 where its class lives on another rank; norms
    [world·B]: every sample's feature norm for a norm-aware margin. The same loss as
    :func:`~model.heads.margin_ce.margin_cross_entropy` on the whole matrix.
    """
    cos = at_least_fp32(cos)
    if cos.shape[1]:
        mine = target >= 0
        column = torch.where(mine, target, 0)[:, None]
        own = cos.gather(1, column).squeeze(1)
        positive = torch.where(mine, margin(own, norms), own * margin.scale)
        logits = (cos * margin.scale).scatter(1, column, positive[:, None])
    else:  # no rows here (a sampled shard can come out empty): only the sums take part
        logits = cos * margin.scale
    return _ShardedCrossEntropy.apply(logits, target, ranks)
