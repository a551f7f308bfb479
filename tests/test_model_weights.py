"""Weights from a file into a feature encoder: model.json beside it, strict loading."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import UserError
from model.backbones import get_model
from model.weights import load_backbone


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
