"""Flip-tested batched features and the feature cache."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evaluate.features import cached_features, extract_features


class Tiny(nn.Module):
    """Position-sensitive linear map, so a mirrored image gives a different feature."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 112 * 112, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_flip_adds_mirror_feature_and_batches_agree():
    torch.manual_seed(0)
    net = Tiny()
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 112, 112), dtype=np.uint8)
    plain = extract_features(net, images, device="cpu", batch_size=2, flip=False)
    mirrored = extract_features(net, images[..., ::-1].copy(), device="cpu", flip=False)
    both = extract_features(net, torch.from_numpy(images), device="cpu", batch_size=3)
    assert both.shape == (5, 8) and both.dtype == np.float32
    np.testing.assert_allclose(both, plain + mirrored, rtol=1e-5, atol=1e-5)


def test_cache_reused_only_for_same_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.full((2, 3), len(calls), dtype=np.float32)

    cache = tmp_path / "f.npy"
    first = cached_features(cache, {"model": "a"}, compute)
    again = cached_features(cache, {"model": "a"}, compute)
    other = cached_features(cache, {"model": "b"}, compute)
    assert len(calls) == 2
    np.testing.assert_array_equal(first, again)
    assert other[0, 0] == 2
