"""--activation-checkpointing: the plain step's gradients and BatchNorm statistics, fewer
bytes kept for backward (counted as autograd saves them), and the option's checks."""

from __future__ import annotations

import copy

import pytest
import torch

from common.errors import UserError
from model.backbones import get_model
from model.backbones.iresnet import IResNet
from model.memory import saved_tensor_bytes
from train.__main__ import build_parser
from train.config import resolve


def _tiny(network: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if network == "iresnet":
        return IResNet((1, 1, 1, 1), embedding_size=8)
    return get_model("mbf", embedding_size=8, blocks=(1, 1, 1, 1), scale=1)


@pytest.mark.parametrize("network", ["iresnet", "mbf"])
def test_checkpointed_step_equals_the_plain_step(network: str) -> None:
    """Bit-identical gradients and buffers; BN's running statistics moved once, not again by
    the recomputation in backward."""
    plain = _tiny(network)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    images = torch.randn(2, 3, 112, 112)
    for model in (plain, checkpointed):
        model(images).square().sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.equal(a.grad, b.grad)
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(a, b), name
    counts = [b for name, b in checkpointed.named_buffers() if name.endswith("batches_tracked")]
    assert counts and all(int(count) == 1 for count in counts)


@pytest.mark.parametrize(("network", "most"), [("iresnet", 0.35), ("mbf", 0.2)])
def test_checkpointing_keeps_fewer_bytes_for_backward(network: str, most: float) -> None:
    plain = _tiny(network)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing = True
    images = torch.randn(2, 3, 112, 112)
    kept = [saved_tensor_bytes(lambda m=m: m(images), m.parameters())[0]
            for m in (plain, checkpointed)]
    assert kept[1] < most * kept[0]


def test_the_class_encoder_under_no_grad_is_not_checkpointed() -> None:
    model = _tiny("iresnet")
    model.activation_checkpointing = True
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: model(torch.randn(2, 3, 112, 112)))[0] == 0


def test_not_with_compile(tmp_path) -> None:
    args = build_parser().parse_args(["--shards", str(tmp_path), "--activation-checkpointing",
                                      "--compile"])
    with pytest.raises(UserError, match="--activation-checkpointing with --compile"):
        resolve(args)
