"""Flip-tested batched features, the feature cache and backbone loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import UserError
from evaluate.features import cached_features, extract_features, load_backbone
from model.backbones import get_model


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


def test_load_backbone_reads_model_json_and_rejects_wrong_network(tmp_path):

    net = get_model("r18", embedding_size=64)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps({"network": "r18", "embedding_size": 64}))
    loaded = load_backbone(tmp_path / "model.pt")
    assert not loaded.training
    x = torch.zeros(1, 3, 112, 112)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net.eval()(x))
    with pytest.raises(UserError, match="--network"):
        load_backbone(tmp_path / "model.pt", network="r34")


def test_load_backbone_rebuilds_network_args_from_model_json(tmp_path):
    """A slim network trained with --network-args loads for evaluation without extra flags."""
    args = {"blocks": [1, 1, 1, 1], "scale": 1}
    net = get_model("mbf", embedding_size=32, **args)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(
        {"network": "mbf", "embedding_size": 32, "network_args": args}))
    loaded = load_backbone(tmp_path / "model.pt")
    x = torch.zeros(2, 3, 112, 112)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net.eval()(x))


def test_training_checkpoint_is_named_not_loaded(tmp_path):
    """A checkpoint (state dicts nested under keys) is not a backbone's state dict."""
    net = get_model("r18", embedding_size=64)
    torch.save({"backbone": net.state_dict(), "step": 3}, tmp_path / "step-3.pt")
    with pytest.raises(UserError, match=r"step-3\.pt: key 'backbone' holds OrderedDict, not"):
        load_backbone(tmp_path / "step-3.pt", network="r18")
    with pytest.raises(UserError, match=r"missing\.pt: no such weights file"):
        load_backbone(tmp_path / "missing.pt")
