"""The memory planner (train/plan.py, ``python -m train --plan``): its activation bytes against
what autograd really saves on the CPU, its peak's parts, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from model.backbones import get_model
from model.memory import saved_tensor_bytes
from tests.helpers import run_module
from train.config import DEFAULTS
from train.plan import predict

TINY_NET = {"blocks": [1, 1, 1, 1], "scale": 1}
TINY = ["--network", "mbf", "--network-args", json.dumps(TINY_NET), "--embedding-size", "16",
        "--batch-size", "4"]


def _config(**changes) -> dict:
    return {**DEFAULTS, "network": "mbf", "network_args": json.dumps(TINY_NET),
            "embedding_size": 16, "batch_size": 4, "precision": "bf16", **changes}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicted_activations_are_the_bytes_saved_on_the_cpu(checkpointing: bool) -> None:
    """Fake tensors predict, within 5 %, what a real bf16 forward saves for backward."""
    config = _config(activation_checkpointing=checkpointing, head="fc")
    predicted = predict(config, num_classes=50).components["activations"]
    torch.manual_seed(0)
    model = get_model("mbf", embedding_size=16, **TINY_NET)
    model.activation_checkpointing = checkpointing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real, _ = saved_tensor_bytes(lambda: model(torch.randn(4, 3, 112, 112)),
                                     model.parameters())
    assert abs(predicted / real - 1) < 0.05, (predicted, real)


def test_peak_holds_the_state_and_grows_with_the_head() -> None:
    small, large = (predict(_config(head="fc"), n) for n in (100, 200_000))
    parts = large.components
    assert parts["head_and_its_grad"] == 2 * 200_000 * 16 * 4  # W and its gradient, fp32
    assert parts["optimizer_state"] >= 200_000 * 16 * 4  # W's momentum
    assert large.peak - small.peak >= 3 * (200_000 - 100) * 16 * 4
    attfc = predict(_config(head="attfc"), 200_000).components
    assert attfc["class_encoder_working_set"] > 0
    capacity = 60_000  # S = r·N = 0.3 · 200k, a multiple of B = 4
    assert attfc["head_and_its_grad"] == capacity * (16 * 4 + 8) + 8  # centres, labels, ptr


def test_accumulation_predicts_one_micro_batch_of_activations() -> None:
    whole, halves = (predict(_config(head="fc", accumulate=n), 50) for n in (1, 2))
    activations = whole.components["activations"], halves.components["activations"]
    assert activations[1] == pytest.approx(activations[0] / 2, rel=0.05)  # + weight copies
    assert halves.peak < whole.peak


def test_plan_cli_json_without_shards_and_its_suggestion() -> None:
    done = run_module("train", "--plan", "--json", "--num-classes", "100", *TINY,
                      "--gpu-memory", "0.0001", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["fits"] is False and report["num_classes"] == 100
    assert report["suggestion"] == "nothing fits: even B=8 exceeds --gpu-memory"
    assert report["peak_gib"] == pytest.approx(sum(report["components"].values()), abs=0.01)


def test_plan_needs_shards_or_num_classes() -> None:
    done = run_module("train", "--plan", *TINY, timeout=120)
    assert done.returncode == 2
    assert "--shards is required" in done.stderr and "--num-classes" in done.stderr
