"""One float32 policy (TF32 on CUDA) in the training step, in evaluation and in the benches:
each sets it itself, so a bench cannot time faster math than the product runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.device import apply_tf32_policy


@pytest.fixture
def tf32_off():
    """Both TF32 flags off for the test, restored afterwards (they are process-wide)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tf32_on() -> bool:
    return torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_policy_sets_tf32_for_cuda_and_leaves_cpu_math_alone(tf32_off) -> None:
    cpu_before = torch.backends.mkldnn.matmul.fp32_precision
    apply_tf32_policy()
    assert _tf32_on()
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu_before


def test_the_training_step_applies_it(tf32_off) -> None:
    from train.step import TrainStep, make_optimizer

    backbone, head = nn.Linear(4, 2), nn.Linear(2, 2)
    optimizer = make_optimizer(list(backbone.parameters()), lr=0.1, momentum=0.9,
                               weight_decay=0.0)
    TrainStep(backbone, head, optimizer, device="cpu", precision="fp32", channels_last=False)
    assert _tf32_on()


def test_evaluation_applies_it(tf32_off) -> None:
    from evaluate.features import TorchEmbedder

    TorchEmbedder(nn.Linear(4, 2), "cpu")
    assert _tf32_on()
