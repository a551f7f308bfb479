"""What every head does with its margin: the feature norms it needs, the margin softmax
cross-entropy over a dense cosine matrix (FC and Partial FC, Eq. 1-2), and the margin's own
loss terms (MagFace's regulariser) added to the head's loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.heads.collective import Ranks, gather_features
from model.heads.interface import HeadOutput
from model.margins import Margin
from model.precision import at_least_fp32


def sample_norms(margin: Margin, features: torch.Tensor, ranks: Ranks | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(this rank's feature norms [B], the global batch's [world·B]) in fp32, before
    normalisation, or two Nones when the margin does not use them.

    In training the margin observes the global batch's norms here (AdaFace's EMA), so on
    several ranks every rank keeps the statistics one process with the global batch keeps.
    The global norms are differentiable (their gradient reaches each rank's features).
    """
    if not margin.uses_norms:
        return None, None
    with torch.autocast(device_type=features.device.type, enabled=False):
        norms = at_least_fp32(features).norm(dim=1)
    everyone = norms if ranks is None else gather_features(norms[:, None], ranks).squeeze(1)
    if margin.training:
        margin.observe(everyone.detach())
    return norms, everyone


def margin_cross_entropy(cos: torch.Tensor, target: torch.Tensor, margin: Margin,
                         norms: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE of ``s·cos`` with the target column replaced by the margin logit ``s·ψ(θ)``.

    cos: [B, C] cosines (upcast to fp32), target: [B] column of each sample's positive,
    norms: [B] feature norms for a norm-aware margin.
    """
    cos = at_least_fp32(cos)
    positive = margin(cos.gather(1, target[:, None]).squeeze(1), norms)
    logits = cos * margin.scale
    logits = logits.scatter(1, target[:, None], positive[:, None])
    return F.cross_entropy(logits, target)


def margin_head_output(loss: torch.Tensor, margin: Margin, norms: torch.Tensor | None,
                       stats: dict[str, torch.Tensor] | None = None,
                       class_scores: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> HeadOutput:
    """The head's output with the margin's loss terms added and logged apart, and its stats.

    ``norms``: this rank's samples' (a term is a mean over the rank's own samples, which
    data-parallel averaging turns into the global batch's mean).
    """
    stats = dict(stats or {})
    if norms is not None:
        terms = margin.loss_terms(norms)
        for term in terms.values():
            loss = loss + term
        stats.update(terms)
        stats.update(margin.stats(norms))
    return HeadOutput(loss, stats, class_scores)
