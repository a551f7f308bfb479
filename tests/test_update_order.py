"""The two container update orders (paper: push then loss; official: loss then push) against
hand-computed numbers, and gradient-norm clipping in the train step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data_engine.loading.batch import Batch
from model.heads import build_head
from model.heads.fc import FCHead
from model.margins import build_margin
from train.step import TrainStep, make_optimizer

S_SCALE, MARGIN = 2.0, 0.5


def _head(order: str) -> nn.Module:
    """S = 0.4·5 = 2 = B; k = 1; the class encoder is Flatten, so K is the 'image' itself."""
    head = build_head("attfc", num_classes=5, embedding_size=2, batch_size=2,
                      margin=build_margin("arcface", s=S_SCALE, m=MARGIN),
                      feature_encoder=nn.Flatten(), sample_rate=0.4, k=1, update_order=order)
    assert head.dcc.capacity == 2
    # Before the step: slot 0 = [-1, 0] (label 7), slot 1 = [0.6, 0.8] (label 1).
    head.dcc.centers.copy_(torch.tensor([[-1.0, 0.0], [0.6, 0.8]]))
    head.dcc.labels.copy_(torch.tensor([7, 1]))
    return head


# f1 = [0.8, 0.6], f2 = [-0.6, 0.8]; their class images give w1 = [1, 0], w2 = [0, 1]
# (k = 1: α = 1), so cos(f, w⁺) = 0.8 for both and both positives are s·cos(acos 0.8 + m).
F_IN = torch.tensor([[0.8, 0.6], [-0.6, 0.8]])
K_IN = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])[..., None, None]
LABELS = torch.tensor([0, 1])
P = S_SCALE * math.cos(math.acos(0.8) + MARGIN)


def test_paper_order_pushes_first_so_batch_gccs_are_negatives() -> None:
    head = _head("paper")
    out = head(F_IN, LABELS, K_IN)
    # The container is now [w1 (0), w2 (1)]: the old entries left before the logits.
    # Sample 1: negative w2, s·0.6 = 1.2; sample 2: negative w1, s·(−0.6). Nothing masked.
    expected = (math.log(1 + math.exp(1.2 - P)) + math.log(1 + math.exp(-1.2 - P))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.stats["masked_conflicts"].item() == 0


def test_official_order_uses_the_queue_before_the_push() -> None:
    head = _head("official")
    out = head(F_IN, LABELS, K_IN)
    # Negatives are the two old entries. Sample 1 (label 0): s·(−0.8) and s·(0.48 + 0.48).
    # Sample 2 (label 1): s·0.6 for slot 0; slot 1 has its label: masked (a conflict).
    loss1 = math.log(1 + math.exp(-1.6 - P) + math.exp(1.92 - P))
    loss2 = math.log(1 + math.exp(1.2 - P))
    assert out.loss.item() == pytest.approx((loss1 + loss2) / 2, rel=1e-6)
    assert out.stats["masked_conflicts"].item() == 1
    # ...and the push still happens, after the loss: the same container as the paper's order.
    torch.testing.assert_close(head.dcc.centers, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert head.dcc.labels.tolist() == [0, 1] and head.dcc.ptr.item() == 0


@pytest.mark.parametrize("order", ["paper", "official"])
def test_gradient_matches_explicit_logits(order: str) -> None:
    torch.manual_seed(0)
    head = build_head("attfc", num_classes=20, embedding_size=3, batch_size=4,
                      margin=build_margin("arcface", s=S_SCALE, m=MARGIN),
                      feature_encoder=nn.Flatten(), sample_rate=0.4, k=2, update_order=order)
    head.dcc.labels.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    centers, labels_before = head.dcc.centers.clone(), head.dcc.labels.clone()
    f = torch.randn(4, 3, requires_grad=True)
    K = torch.randn(4, 2, 3)
    y = torch.tensor([1, 1, 9, 4])
    head(f, y, K[..., None, None]).loss.backward()

    fu = F.normalize(f, dim=1)
    with torch.no_grad():
        alpha = torch.softmax(F.cosine_similarity(fu[:, None], K, dim=-1), dim=1)
        own = F.normalize(torch.einsum("bk,bkd->bd", alpha, K), dim=1)
    if order == "paper":  # slots 0..3 replaced by this batch before the logits
        centers[:4], labels_before[:4] = own, y
    cos_pos = (fu * own).sum(1).clamp(-1, 1)
    positive = S_SCALE * torch.cos(torch.acos(cos_pos) + MARGIN)
    negatives = (S_SCALE * fu @ centers.t()).masked_fill(y[:, None] == labels_before, -1e9)
    logits = torch.cat([positive[:, None], negatives], dim=1)
    reference = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    grad = torch.autograd.grad(reference, f)[0]
    torch.testing.assert_close(f.grad, grad, rtol=1e-4, atol=1e-6)


def test_unknown_update_order_is_refused() -> None:
    with pytest.raises(ValueError, match="update order"):
        _head("moco")


def _step_setup(clip: float) -> tuple[TrainStep, nn.Module, nn.Module, Batch]:
    torch.manual_seed(1)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    head = FCHead(6, 4, build_margin("arcface", s=8.0, m=0.5))
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = make_optimizer(params, lr=1.0, momentum=0.0, weight_decay=0.0)
    step = TrainStep(backbone, head, optimizer, device="cpu", precision="fp32",
                     channels_last=False, clip_grad_norm=clip)
    images = torch.randint(0, 256, (3, 3, 2, 2), dtype=torch.uint8)
    batch = Batch(identity=images, classes=images[:, None], labels=torch.tensor([0, 3, 5]),
                  image_ids=torch.arange(3), class_image_ids=torch.arange(3)[:, None])
    return step, backbone, head, batch


def _raw_gradient_norm(backbone: nn.Module, head: nn.Module, batch: Batch) -> torch.Tensor:
    from model.backbones import normalize_images

    b, h = copy.deepcopy(backbone), copy.deepcopy(head)
    loss = h(b(normalize_images(batch.identity)), batch.labels).loss
    grads = torch.autograd.grad(loss, [*b.parameters(), *h.parameters()])
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@pytest.mark.parametrize("clip", [0.05, 0.0, 1e6])
def test_clip_grad_norm_bounds_the_update(clip: float) -> None:
    step, backbone, head, batch = _step_setup(clip)
    raw = _raw_gradient_norm(backbone, head, batch)
    before = [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]]
    step(batch, lr=1.0)
    after = [p.detach() for p in [*backbone.parameters(), *head.parameters()]]
    # SGD with lr 1, no momentum or decay: the update is minus the (clipped) gradient.
    moved = torch.linalg.vector_norm(torch.cat([(a - b).flatten()
                                                for a, b in zip(after, before)]))
    assert raw > 0.05  # so the first case really clips
    expected = min(raw.item(), clip) if clip else raw.item()
    assert moved.item() == pytest.approx(expected, rel=1e-4)
