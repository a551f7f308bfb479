"""The official AttFC code's formulation of the head: a speed baseline for bench/, not product code.

Written from a description of the public implementation (LovE-K/AttFC, ``dcc.py``), so that
"faster than the official AttFC" is a ratio measured in the same run as ours. Per step it
- runs the class encoder on the k class-image batches concatenated into one [k·B] batch;
- builds the attention weights on the host: each of the k cosine-similarity rows [B] is
  copied from the device into a host tensor, softmax runs there and α goes back to the
  device (k + 1 transfers and syncs per step); w⁺ = Σ α_j K_j, normalised;
- materialises the logits: l_pos = f·w⁺ [B, 1], l_neg = f·queue [B, S] against a D×S queue,
  the same-label mask by arithmetic (``labels − queue_labels == 0`` as a float matrix,
  ``l_neg·(1 − mask) − 1e9·mask``), ``cat`` into [B, 1 + S], clamp to [−1, 1], the scale s
  on all and the margin logit written into column 0, then torch's standard cross-entropy
  with target 0 —
  autograd keeps every B×(1+S) intermediate for the backward;
- then pushes the B new w⁺ into the queue (after the logits: a sample's own w⁺ is only in
  column 0), reading the queue pointer back to the host;
- updates the class encoder by momentum one parameter at a time, with a new tensor per
  parameter (the official code does this at the start of its forward; here it runs in
  ``after_optimizer_step``, the same work once per step).

The loss is the paper's Eq. 10 up to the masked entries: at cos = −1 after the clamp they
still add e^{−s} each instead of 0 (negligible at s = 64).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model.heads.attfc import dcc_capacity
from model.heads.interface import HeadOutput
from model.margins import CombinedMargin


class OfficialAttFCHead(nn.Module):
    """The Head protocol around the official formulation (see the module docstring)."""

    needs_class_images = True

    def __init__(self, feature_encoder: nn.Module, num_classes: int, embedding_size: int,
                 batch_size: int, margin: CombinedMargin, sample_rate: float = 0.3,
                 k: int = 2, momentum: float = 0.999) -> None:
        super().__init__()
        self.class_encoder = copy.deepcopy(feature_encoder).requires_grad_(False)
        self.margin = margin
        self.k = k
        self.momentum = momentum
        self.batch_size = batch_size
        size = dcc_capacity(num_classes, sample_rate, batch_size)
        self.register_buffer("queue", F.normalize(torch.randn(embedding_size, size), dim=0))
        self.register_buffer("queue_labels", torch.full((1, size), -1.0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_images: torch.Tensor | None = None) -> HeadOutput:
        if class_images is None:
            raise ValueError("the official attfc head needs class_images [B, k, ...]")
        f_unit = F.normalize(features, dim=1)
        with torch.no_grad():
            w_plus = F.normalize(self._class_centres(features, class_images), dim=1)
        l_pos = torch.einsum("nc,nc->n", f_unit, w_plus)[:, None]
        l_neg = torch.einsum("nc,ck->nk", f_unit, self.queue.clone())
        mask = ((labels.float()[:, None] - self.queue_labels) == 0).float()
        l_neg = l_neg * (1 - mask) + (-1e9 * mask)
        logits = torch.cat([l_pos, l_neg], dim=1).float().clamp(-1, 1)
        self._enqueue(w_plus, labels)
        positive = self.margin(logits[:, 0])  # s·ψ(θ) of column 0
        logits = logits * self.margin.scale
        logits[:, 0] = positive
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return HeadOutput(F.cross_entropy(logits, target), {})

    def _class_centres(self, features: torch.Tensor, class_images: torch.Tensor) -> torch.Tensor:
        """Σ_j α_j K_j with α = softmax_j(cos(f, K_j)) computed on the host."""
        batch = class_images.shape[0]
        stacked = torch.cat([class_images[:, j] for j in range(self.k)], dim=0)
        encoded = self.class_encoder(stacked).float()
        K = torch.split(encoded, batch, dim=0)
        cos = torch.zeros(self.k, batch)  # on the host, as the official code allocates it
        for j, K_j in enumerate(K):
            cos[j] = F.cosine_similarity(features.float(), K_j, dim=1)
        alpha = torch.softmax(cos.t(), dim=1).to(features.device)
        centre = 0
        for j in range(self.k):
            centre = centre + alpha[:, j:j + 1] * K[j]
        return centre

    @torch.no_grad()
    def _enqueue(self, w_plus: torch.Tensor, labels: torch.Tensor) -> None:
        ptr = int(self.queue_ptr)
        n = w_plus.shape[0]
        self.queue[:, ptr:ptr + n] = w_plus.t().to(self.queue.dtype)
        self.queue_labels[:, ptr:ptr + n] = labels.float()[None, :]
        self.queue_ptr[0] = (ptr + n) % self.queue.shape[1]

    @torch.no_grad()
    def after_optimizer_step(self, feature_encoder: nn.Module) -> None:
        """θ_C ← γθ_C + (1−γ)θ_F, parameter by parameter, a new tensor each."""
        for c_param, f_param in zip(self.class_encoder.parameters(),
                                    feature_encoder.parameters(), strict=True):
            c_param.data = c_param.data * self.momentum + f_param.data * (1.0 - self.momentum)
