"""How spread out a batch's embeddings are: the cosine between different identities' features.

Logged with the loss for every head. A run whose features crowd into a narrow cone (an
AttFC run at a high learning rate can put different people at cosine 0.9 and more) can still
verify well, but every threshold moves with the cone, and Eq. 8's attention, a softmax over
raw cosines, cannot tell class images apart inside it: its weights go nearly uniform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def embedding_spread(features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and median cosine over the batch's pairs of different labels, on the device
    (no host sync; NaN when every sample has the same label). The median is the lower
    middle value, as torch takes it."""
    unit = F.normalize(features.detach().float(), dim=1)
    cos = unit @ unit.T
    other = labels[:, None] != labels[None, :]
    mean = torch.where(other, cos, 0.0).sum() / other.sum()
    median = torch.nanmedian(torch.where(other, cos, float("nan")))
    return {"spread_cos_mean": mean, "spread_cos_median": median}
