"""What a checkpoint carries across a resume and what a skipped step leaves behind, on the
real step, heads and checkpoint files of a tiny network (no subprocess: these are the
in-process halves of what ``python -m train`` does at --resume and at a non-finite loss)."""

from __future__ import annotations

import logging

import pytest
import torch

from data_engine.loading.batch import Batch
from model.backbones import get_model
from model.heads import build_head
from model.margins import build_margin
from train.checkpoint import (
    RunParts,
    load_checkpoint,
    restore_state,
    rng_state,
    save_checkpoint,
    save_state,
    set_rng_state,
)
from train.distributed import World
from train.image_stats import ImageStats
from train.step import TrainStep, make_optimizer

CLASSES, IMAGES, K, B = 8, 16, 2, 4


def _parts(head_name: str = "fc", seed: int = 0, accumulate: int = 1
           ) -> tuple[TrainStep, RunParts]:
    torch.manual_seed(seed)
    backbone = get_model("mbf", embedding_size=16, blocks=(1, 1, 1, 1), scale=1)
    head = build_head(head_name, feature_encoder=backbone, num_classes=CLASSES,
                      embedding_size=16, batch_size=B, margin=build_margin("arcface"), k=K,
                      sample_rate=0.5)
    params = [p for m in (backbone, head) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    stats = ImageStats(IMAGES, K, "cpu") if head.needs_class_images else None
    step = TrainStep(backbone, head, optimizer, device="cpu", precision="fp32",
                     channels_last=False, image_stats=stats, accumulate=accumulate)
    return step, RunParts(backbone, head, optimizer, step.scaler, stats, World(), "cpu")


def _batch(seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        identity=torch.randint(0, 256, (B, 3, 112, 112), dtype=torch.uint8, generator=generator),
        classes=torch.randint(0, 256, (B, K, 3, 112, 112), dtype=torch.uint8,
                              generator=generator),
        labels=torch.randint(0, CLASSES, (B,), generator=generator),
        image_ids=torch.randint(0, IMAGES, (B,), generator=generator),
        class_image_ids=torch.randint(0, IMAGES, (B, K), generator=generator))


def _checkpoint(parts: RunParts, directory) -> dict:
    path = save_state(parts, {"position": {"step": 1}}, ckpt_dir=directory, run_dir=directory,
                      keep=1)
    return load_checkpoint(path)


def _trained(parts: RunParts) -> list[torch.Tensor]:
    params = [p for group in parts.optimizer.param_groups for p in group["params"]]
    return [t.detach().clone() for t in params] + [
        parts.optimizer.state[p]["momentum_buffer"].clone() for p in params]


def test_channels_last_momentum_resumes_like_nchw(tmp_path):
    """A CUDA run's checkpoint holds channels-last momentum for the convs; resumed on the CPU
    (NCHW weights) the next step must be bit for bit the one from NCHW momentum."""
    step, parts = _parts()
    step(_batch(1), lr=0.1)
    state = _checkpoint(parts, tmp_path / "nchw")
    moments = state["optimizer"]["state"]
    as_cuda_writes = {**state, "optimizer": {**state["optimizer"], "state": {
        i: {**m, "momentum_buffer": m["momentum_buffer"].contiguous(
            memory_format=torch.channels_last) if m["momentum_buffer"].dim() == 4
            else m["momentum_buffer"]} for i, m in moments.items()}}}
    save_checkpoint(tmp_path / "nhwc", 1, as_cuda_writes, keep=1)
    channels_last = load_checkpoint(tmp_path / "nhwc" / "step-000000001.pt")
    buffers = [m["momentum_buffer"] for m in channels_last["optimizer"]["state"].values()]
    assert any(b.dim() == 4 and not b.is_contiguous() and b.shape[1] > 1 for b in buffers)

    ends = []
    for saved in (state, channels_last):
        resumed_step, resumed = _parts(seed=1)  # every weight comes from the checkpoint
        restore_state(resumed, saved)
        resumed_step(_batch(2), lr=0.1)
        ends.append(_trained(resumed))
    assert all(torch.equal(a, b) for a, b in zip(*ends, strict=True))


def _left_behind(step: TrainStep, parts: RunParts) -> dict[str, torch.Tensor]:
    """Everything a forward may write besides the weights: BN statistics, attfc's container
    and class encoder buffers, the per-image statistics."""
    found = {f"backbone {n}": b for n, b in parts.backbone.named_buffers()}
    found.update({f"head {n}": b for n, b in parts.head.named_buffers()})
    if parts.image_stats is not None:
        found.update({f"image_stats {n}": v for n, v in parts.image_stats.state_dict().items()})
    return {name: value.clone() for name, value in found.items()}


@pytest.mark.parametrize("head, accumulate", [("attfc", 1), ("attfc", 2), ("fc", 1),
                                              ("partialfc", 2)])
def test_a_nonfinite_forward_leaves_no_trace(head, accumulate):
    """A batch that turns the forward NaN is skipped without a trace: BN running statistics,
    the container (no NaN centre pushed, pointer kept) and the image statistics are as
    before it, and the next step's loss is finite; also over micro-batches."""
    step, parts = _parts(head, accumulate=accumulate)
    step(_batch(1), lr=0.1)
    assert step.read_loss() > 0
    before = _left_behind(step, parts)
    bad = _batch(2)
    bad.identity = bad.identity.float()
    bad.identity[-1, 0, 0, 0] = float("nan")  # one pixel: BN spreads it over its batch
    step(bad, lr=0.1)
    assert int(step.nonfinite_total) == 1
    after = _left_behind(step, parts)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, changed
    step(_batch(3), lr=0.1)
    assert int(step.nonfinite_in_row) == 0 and step.read_loss() > 0  # finite, counted


def test_cuda_rng_state_is_this_gpus_only(monkeypatch):
    """A checkpoint holds the generator of the saving process's own GPU; one that holds
    several (older checkpoints: every GPU rank 0 could see) resumes on a machine with fewer.
    No GPU here: torch.cuda's generator calls are stand-ins for a machine with one GPU,
    which raise as torch does for a device it does not have."""
    gpus = {0: torch.zeros(4, dtype=torch.uint8)}

    def get_state(device="cuda"):
        return gpus[torch.device(device).index or 0].clone()

    def set_state(state, device="cuda"):
        index = torch.device(device).index or 0
        if index not in gpus:
            raise IndexError(f"no GPU {index}")
        gpus[index] = state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    saved = rng_state("cuda:0")
    assert torch.equal(saved["cuda"], gpus[0])
    eight_gpus = {**saved, "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    set_rng_state(eight_gpus, "cuda:0")
    assert gpus[0].tolist() == [0] * 4 and list(gpus) == [0]
    set_rng_state({**saved, "cuda": torch.full((4,), 7, dtype=torch.uint8)}, "cuda:0")
    assert gpus[0].tolist() == [7] * 4
    set_rng_state({**saved, "cuda": torch.full((4,), 9, dtype=torch.uint8)}, "cpu")
    assert gpus[0].tolist() == [7] * 4 and "cuda" not in rng_state("cpu")


def test_fp16_resume_of_a_bf16_or_fp32_run_starts_the_scaler_afresh(tmp_path, caplog):
    """bf16/fp32 checkpoints hold no loss-scaler state; an fp16 resume starts the scaler as a
    new run does (one log line) instead of raising. GradScaler on the CPU stands in for the
    CUDA one fp16 training uses: the same class and state_dict."""
    step, parts = _parts()
    step(_batch(1), lr=0.1)
    state = _checkpoint(parts, tmp_path)
    assert state["scaler"] == {}
    _, fp16 = _parts()
    fp16.scaler = torch.amp.GradScaler("cpu", enabled=True)
    with caplog.at_level(logging.INFO):
        restore_state(fp16, state)
    assert fp16.scaler.get_scale() == 65536.0 and "scaler starts afresh" in caplog.text
    _, back_to_fp32 = _parts()  # and an fp16 checkpoint resumed in bf16/fp32 drops it
    restore_state(back_to_fp32, {**state, "scaler": fp16.scaler.state_dict()})
    assert not back_to_fp32.scaler.is_enabled()
