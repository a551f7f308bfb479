"""Margin softmax cross-entropy over a dense cosine matrix (FC and Partial FC, Eq. 1-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.margins import CombinedMargin


def margin_cross_entropy(cos: torch.Tensor, target: torch.Tensor,
                         margin: CombinedMargin) -> torch.Tensor:
    """Mean CE of ``s·cos`` with the target column replaced by the margin logit ``s·ψ(θ)``.

    cos: [B, C] cosines (upcast to fp32), target: [B] column of each sample's positive.
    """
    cos = cos.float()
    positive = margin(cos.gather(1, target[:, None]).squeeze(1))
    logits = cos * margin.scale
    logits = logits.scatter(1, target[:, None], positive[:, None])
    return F.cross_entropy(logits, target)
