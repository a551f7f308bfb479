"""The embedding-spread diagnostic: cosine between different identities' features in the
batch, pinned on a hand-computed case and logged by a real training step of every head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from data_engine.loading.batch import Batch
from model.backbones import normalize_images
from model.heads import build_head
from model.margins import build_margin
from model.names import HEADS
from train.embedding_spread import embedding_spread
from train.step import TrainStep, make_optimizer


def test_mean_and_median_over_pairs_of_different_labels():
    # unit vectors at 0°, 53.13°, 90°, 180°; labels 0, 0, 1, 2: five different-label pairs
    # with cosines 0, -1, 0.8, -0.6, 0 (the same-label pair 0.6 is left out)
    features = torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.0, 3.0], [-1.0, 0.0]])
    spread = embedding_spread(features, torch.tensor([0, 0, 1, 2]))
    assert spread["spread_cos_mean"].item() == pytest.approx(-0.16)
    assert spread["spread_cos_median"].item() == pytest.approx(0.0, abs=1e-7)
    one_label = embedding_spread(features, torch.zeros(4, dtype=torch.long))
    assert all(math.isnan(value.item()) for value in one_label.values())


@pytest.mark.parametrize("head_name", HEADS)
def test_every_head_logs_the_spread_of_the_step_features(head_name):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.AvgPool2d(16), nn.Flatten(), nn.Linear(3 * 7 * 7, 8))
    k, batch_size = 2, 4
    head = build_head(head_name, num_classes=6, embedding_size=8, batch_size=batch_size,
                      margin=build_margin("cosface", s=30.0, m=0.2), feature_encoder=encoder,
                      k=k, sample_rate=1.0)
    optimizer = make_optimizer([*encoder.parameters(), *head.parameters()], lr=0.1,
                               momentum=0.9, weight_decay=5e-4)
    step = TrainStep(encoder, head, optimizer, device="cpu", precision="fp32",
                     channels_last=False)
    images = torch.randint(0, 256, (batch_size * (k + 1), 3, 112, 112), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 5])
    batch = Batch(identity=images[:batch_size],
                  classes=images[batch_size:].unflatten(0, (batch_size, k)), labels=labels,
                  image_ids=torch.arange(batch_size),
                  class_image_ids=torch.zeros(batch_size, k, dtype=torch.long))
    with torch.no_grad():
        expected = embedding_spread(encoder(normalize_images(batch.identity)), labels)
    stats = step(batch, 0.1)
    for name, value in expected.items():
        assert stats[name].item() == pytest.approx(value.item(), abs=1e-6), name
