"""Gradient accumulation (--accumulate N): a step over B samples taken as N micro-batches
of B/N equals the single-batch step, for every head and both attfc update orders.

Float64 throughout and a network without BatchNorm, so the only differences are the
summation order's rounding (1e-16 relative): parameters, SGD momentum buffers and the attfc
container must agree to 1e-10 after three steps. With BatchNorm in training mode each
micro-batch is normalised by its own statistics, which changes the step by far more than
rounding, and accounts for all of it: the single-batch step of a network normalising the
batch in those groups agrees to 1e-10, and so does the step with BatchNorm frozen (eval).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from data_engine.loading.batch import Batch
from model.heads import build_head
from model.margins import build_margin
from tests.helpers import assert_one_line_error
from train.step import TrainStep, make_optimizer, micro_batches

B, K_IMAGES, SIDE, DIM, STEPS, LR = 8, 2, 8, 6, 3, 0.05
EXACT = 1e-10
HEADS = [("fc", "paper"), ("partialfc", "paper"), ("attfc", "paper"), ("attfc", "official")]


class Tiny(nn.Module):
    """Images -> float64 features. ``batch_norm``: a BatchNorm2d after the convolution, which
    normalises the batch as ``ghosts`` consecutive equal groups, each by its own statistics
    (as micro-batches are), updating the running statistics once per group."""

    def __init__(self, batch_norm: bool = False, ghosts: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
        self.bn = nn.BatchNorm2d(4, dtype=torch.float64) if batch_norm else None
        self.ghosts = ghosts
        self.fc = nn.Linear(4 * 4, DIM, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.double())
        if self.bn is not None:
            x = torch.cat([self.bn(group) for group in x.chunk(self.ghosts)])
        return self.fc(nn.functional.avg_pool2d(torch.relu(x), 4).flatten(1))


def _batches() -> list[Batch]:
    """Three steps' batches: 40 classes, repeated labels (attfc conflicts, shared positives)."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        identity = torch.randint(0, 256, (B, 3, SIDE, SIDE), dtype=torch.uint8,
                                 generator=generator)
        classes = torch.randint(0, 256, (B, K_IMAGES, 3, SIDE, SIDE), dtype=torch.uint8,
                                generator=generator)
        labels = torch.randint(0, 10, (B,), generator=generator) * 4
        batches.append(Batch(identity=identity, classes=classes, labels=labels,
                             image_ids=torch.arange(B),
                             class_image_ids=torch.arange(B * K_IMAGES).view(B, K_IMAGES)))
    return batches


def _train(head_name: str, order: str, accumulate: int, *, batch_norm: bool = False,
           ghosts: int = 1, frozen_bn: bool = False
           ) -> tuple[dict[str, torch.Tensor], list[float], list[dict[str, float]]]:
    """Weights, head buffers and momentum buffers after STEPS steps, and each step's logged
    loss and stats."""
    torch.manual_seed(0)
    backbone = Tiny(batch_norm, ghosts)
    head = build_head(head_name, num_classes=40, embedding_size=DIM, batch_size=B,
                      margin=build_margin("arcface", s=16.0, m=0.5),
                      feature_encoder=backbone if head_name == "attfc" else None,
                      sample_rate=0.4, k=K_IMAGES, class_encoder_momentum=0.9,
                      update_order=order, dcc_dtype=torch.float64).double()
    if frozen_bn:  # the feature encoder's and attfc's class encoder's, its copy
        for module in (*backbone.modules(), *head.modules()):
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    params = [p for m in (backbone, head) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=LR, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(backbone, head, optimizer, device="cpu", precision="fp32",
                     channels_last=False, accumulate=accumulate)
    losses, stats = [], []
    for batch in _batches():
        stats.append({name: float(value) for name, value in step(batch, lr=LR).items()})
        losses.append(step.read_loss())
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    state.update({f"momentum.{i}": optimizer.state[p]["momentum_buffer"]
                  for i, p in enumerate(params)})
    return state, losses, stats


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *,
                        integers_equal: bool = True) -> float:
    """Max |a − b| over the float tensors; the integer ones (container labels and pointer,
    BatchNorm's batch counts) must be equal unless ``integers_equal`` is False."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key, value in a.items():
        if value.is_floating_point():
            worst = max(worst, float((value - b[key]).abs().max()))
        elif integers_equal:
            assert torch.equal(value, b[key]), key
    return worst


@pytest.mark.parametrize(("head_name", "order"), HEADS)
@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_accumulated_step_equals_the_single_batch_step(head_name, order, accumulate):
    single, single_losses, single_stats = _train(head_name, order, 1)
    state, losses, stats = _train(head_name, order, accumulate)
    assert _largest_difference(state, single) <= EXACT
    assert losses == pytest.approx(single_losses, rel=1e-6)  # reported in fp32
    assert stats == [pytest.approx(s, rel=1e-6) for s in single_stats]  # the whole batch's
    if head_name == "attfc":  # one push of B per step
        assert int(state["head.dcc.ptr"]) == STEPS * B % state["head.dcc.labels"].numel()


def test_the_orders_differ_so_each_is_tested_apart():
    paper = _train("attfc", "paper", 1)[0]
    official = _train("attfc", "official", 1)[0]
    assert _largest_difference(paper, official) > 1e-3


@pytest.mark.parametrize(("head_name", "order"), [("fc", "paper"), ("attfc", "paper"),
                                                  ("attfc", "official")])
def test_batchnorm_statistics_are_the_only_difference(head_name, order):
    """With BatchNorm in training mode the accumulated step is not the single-batch step
    (here > 1e-3 apart: each micro-batch of 4 is normalised by its own mean and variance),
    but it is, to 1e-10, the single-batch step of the same network normalising the batch as
    those groups (running statistics included: updated once per micro-batch); with
    BatchNorm frozen (eval) it is the plain single-batch step."""
    state = _train(head_name, order, 2, batch_norm=True)[0]
    single = _train(head_name, order, 1, batch_norm=True)[0]
    assert _largest_difference(state, single, integers_equal=False) > 1e-3
    grouped = _train(head_name, order, 1, batch_norm=True, ghosts=2)[0]
    assert _largest_difference(state, grouped) <= EXACT
    frozen = _train(head_name, order, 2, batch_norm=True, frozen_bn=True)[0]
    frozen_single = _train(head_name, order, 1, batch_norm=True, frozen_bn=True)[0]
    assert _largest_difference(frozen, frozen_single) <= EXACT


def test_micro_batches_split_every_field_and_refuse_an_uneven_split():
    batch = _batches()[0]
    parts = micro_batches(batch, 4)
    assert [p.labels.tolist() for p in parts] == batch.labels.view(4, 2).tolist()
    assert torch.equal(torch.cat([p.classes for p in parts]), batch.classes)
    with pytest.raises(ValueError, match="does not split into 3"):
        micro_batches(batch, 3)


@pytest.mark.parametrize(("args", "needles"), [
    (["--batch-size", "6", "--accumulate", "4"], ["--accumulate 4", "--batch-size 6"]),
    (["--accumulate", "0"], ["--accumulate 0", "> 0"]),
    (["--accumulate", "2", "--margin", "adaface"], ["--accumulate 2", "adaface"])])
def test_an_impossible_accumulation_is_one_line(run_cli, tmp_path, args, needles):
    done = run_cli("train", "--shards", tmp_path, "--output", tmp_path / "run", *args)
    assert_one_line_error(done, *needles)


@pytest.mark.parametrize(("args", "needle"), [
    (["--heads", "official", "--accumulate", "2"], "the official head has no micro-batch"),
    (["--heads", "attfc", "--batch-size", "6", "--accumulate", "4"], "--batch-size 6")])
def test_the_step_bench_refuses_an_impossible_accumulation(run_cli, args, needle):
    assert_one_line_error(run_cli("bench.train_step", "--device", "cpu", *args), needle)
