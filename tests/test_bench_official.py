"""bench/official_attfc.py, the official AttFC formulation the benches race against, pinned by
a hand-computed case so the baseline computes what it claims to."""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.official_attfc import OfficialAttFCHead
from model.margins import build_margin


def _arcface(cos: float, s: float, m: float) -> float:
    return s * math.cos(math.acos(cos) + m)


def test_official_formulation_by_hand() -> None:
    s, m = 2.0, 0.5
    head = OfficialAttFCHead(nn.Flatten(), num_classes=4, embedding_size=2, batch_size=2,
                             margin=build_margin("arcface", s=s, m=m), sample_rate=1.0, k=2)
    assert head.queue.shape == (2, 4)  # S = r·N = 4, stored D×S as the official code does
    head.queue.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.6], [0.0, 1.0, 0.0, 0.8]]))
    head.queue_labels.copy_(torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    class_features = torch.tensor([[[2.0, 0.0], [0.0, 1.0]],
                                   [[0.0, 3.0], [1.0, 1.0]]])[..., None, None]
    loss = head(features, labels, class_features).loss

    e = math.e
    # Sample 0: cos to its class images (1, 0) -> α = (e, 1)/(1 + e); w⁺ ∝ (2e, 1).
    cos0 = 2 * e / math.sqrt(4 * e * e + 1)
    # Sample 1: cos (1, 1/√2); w⁺ ∝ α1·(0, 3) + α2·(1, 1).
    a1, a2 = (math.exp(1.0), math.exp(1 / math.sqrt(2)))
    w1 = (a2 / (a1 + a2), (3 * a1 + a2) / (a1 + a2))
    cos1 = w1[1] / math.hypot(*w1)
    # Negatives s·cos against the queue; a same-label entry sits at cos = −1 after the clamp.
    negatives0 = [-s, 0.0, -s, 0.6 * s]   # queue label 0 is sample 0's own: masked
    negatives1 = [0.0, s, -s, 0.8 * s]    # queue label 1 (entry 2) is sample 1's: masked
    expected = 0.0
    for cos, negatives in ((cos0, negatives0), (cos1, negatives1)):
        positive = _arcface(cos, s, m)
        expected += -positive + math.log(math.exp(positive) + sum(map(math.exp, negatives)))
    assert abs(loss.item() - expected / 2) < 1e-5, (loss.item(), expected / 2)

    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    # Enqueued after the logits: the two new w⁺ replace the oldest two entries.
    assert head.queue_labels.tolist() == [[0.0, 1.0, 1.0, 2.0]] and int(head.queue_ptr) == 2
    assert torch.allclose(head.queue[:, 0], torch.tensor([2 * e, 1.0]) / math.sqrt(4 * e * e + 1))


def test_official_momentum_update() -> None:
    torch.manual_seed(0)
    feature_encoder = nn.Linear(3, 2)
    head = OfficialAttFCHead(feature_encoder, num_classes=4, embedding_size=2, batch_size=2,
                             margin=build_margin("arcface"), sample_rate=1.0, k=2,
                             momentum=0.9)
    before = head.class_encoder.weight.clone()
    with torch.no_grad():
        feature_encoder.weight.add_(1.0)
    head.after_optimizer_step(feature_encoder)
    assert torch.allclose(head.class_encoder.weight,
                          0.9 * before + 0.1 * feature_encoder.weight)
