"""The heads give the same loss and feature gradient on CUDA as on the CPU (skipped without a
GPU), and a bf16-autocast r18 + attfc step runs end to end on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.backbones import get_model
from model.heads import build_head
from model.margins import build_margin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["fc", "partialfc", "attfc"])
def test_cuda_matches_cpu(name: str) -> None:
    torch.manual_seed(0)
    head = build_head(name, num_classes=5000, embedding_size=64, batch_size=32,
                      margin=build_margin("arcface"), feature_encoder=nn.Flatten(),
                      sample_rate=1.0 if name == "partialfc" else 0.3, chunk_size=500)
    features = torch.randn(32, 64)
    labels = torch.randint(0, 5000, (32,))
    labels[1] = labels[0]  # one same-batch conflict
    class_features = torch.randn(32, 2, 64, 1, 1)
    results = []
    for device in ("cpu", "cuda"):
        h = copy.deepcopy(head).to(device)
        f = features.to(device, copy=True).requires_grad_()
        out = h(f, labels.to(device), class_features.to(device))
        out.loss.backward()
        results.append((out.loss.item(), f.grad.cpu(), {k: v.item() for k, v in out.stats.items()}))
    (cpu_loss, cpu_grad, cpu_stats), (gpu_loss, gpu_grad, gpu_stats) = results
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-3, atol=1e-6)
    assert gpu_stats.get("masked_conflicts") == cpu_stats.get("masked_conflicts")


def test_r18_attfc_bf16_step_on_cuda() -> None:
    torch.manual_seed(0)
    encoder = get_model("r18").cuda().to(memory_format=torch.channels_last)
    head = build_head("attfc", num_classes=1000, embedding_size=512, batch_size=8,
                      margin=build_margin("arcface"), feature_encoder=encoder,
                      dcc_dtype=torch.bfloat16).cuda()
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(8, 3, 112, 112, device="cuda").contiguous(
        memory_format=torch.channels_last)
    class_images = torch.randn(8, 2, 3, 112, 112, device="cuda")
    labels = torch.arange(8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = head(encoder(images), labels, class_images)
    out.loss.backward()
    opt.step()
    head.after_optimizer_step(encoder)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert head.dcc.centers.dtype == torch.bfloat16


def test_gcc_and_normalised_images_on_cuda_autocast() -> None:
    """The CUDA forms of two CPU tests: the GCC stays fp32 under bf16 autocast, and images
    normalised straight into bf16/fp16 equal the fp32 ones rounded once."""
    from model.backbones import normalize_images
    from model.heads.attfc import generate_gcc

    f, K = torch.randn(8, 16, device="cuda"), torch.randn(8, 2, 16, device="cuda")
    plain = generate_gcc(f, K)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = generate_gcc(f, K)[0]
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    x = torch.arange(256, dtype=torch.uint8, device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(normalize_images(x, dtype), normalize_images(x).to(dtype))


def test_partialfc_step_never_syncs_on_cuda() -> None:
    """CUDA's sync debug mode raises on any host sync in the Partial FC forward/backward."""
    torch.manual_seed(0)
    head = build_head("partialfc", num_classes=5000, embedding_size=64, batch_size=32,
                      margin=build_margin("arcface"), sample_rate=0.1).cuda()
    features = torch.randn(32, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 5000, (32,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        head(features, labels).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
