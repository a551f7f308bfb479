"""FC and Partial FC heads, build_head, and the chunked DCC loss against a dense reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from model.heads import HEADS, Head, HeadOutput, build_head
from model.heads.dcc_ce import masked_dcc_cross_entropy
from model.heads.margin_ce import margin_cross_entropy
from model.margins import build_margin


def _build(name: str, **kw) -> nn.Module:
    kw.setdefault("margin", build_margin("arcface", s=4.0, m=0.5))
    return build_head(name, embedding_size=2, batch_size=2, **kw)


def test_fc_loss_by_hand() -> None:
    head = _build("fc", num_classes=3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    out = head(torch.tensor([[1.0, 1.0]]), torch.tensor([1]))
    # cos to the classes: 1/√2, 1/√2, −1; positive (class 1): 4·cos(π/4 + 0.5)
    c = 1 / math.sqrt(2)
    logits = [4 * c, 4 * math.cos(math.pi / 4 + 0.5), -4.0]
    expected = -logits[1] + math.log(sum(math.exp(v) for v in logits))
    assert isinstance(out, HeadOutput) and out.stats == {}
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert not head.needs_class_images


def test_partialfc_keeps_every_positive_and_only_sampled_rows_learn() -> None:
    torch.manual_seed(0)
    head = _build("partialfc", num_classes=50, sample_rate=0.1)  # 5 rows per step
    for labels in (torch.tensor([3, 3, 17]), torch.arange(0, 40, 5)):  # 2 and 8 positives
        index, local = head.sample(labels)
        assert set(labels.tolist()) <= set(index.tolist())
        assert len(index) == max(5, labels.unique().numel())
        assert torch.equal(index[local], labels)
    labels, features = torch.tensor([3, 17]), torch.randn(2, 2)
    torch.manual_seed(1)
    index, _ = head.sample(labels)
    torch.manual_seed(1)  # the forward draws the same sample
    head(features, labels).loss.backward()
    touched = head.weight.grad.abs().sum(dim=1).nonzero().flatten()
    assert set(touched.tolist()) <= set(index.tolist())
    assert {3, 17} <= set(touched.tolist())


def test_partialfc_uses_exactly_rate_or_positives_when_the_batch_is_larger() -> None:
    """B > r·N: the sample keeps B slots (a fixed shape) but only max(r·N, #positives) are
    used; the loss is the margin softmax over those classes alone."""
    torch.manual_seed(0)
    head = _build("partialfc", num_classes=50, sample_rate=0.1)  # r·N = 5
    labels = torch.tensor([3, 3, 3, 3, 3, 3, 17, 17])  # B = 8, 2 positives
    features = torch.randn(8, 2, requires_grad=True)
    torch.manual_seed(1)
    index, local = head.sample(labels)
    assert len(index) == 8 and int((index >= 0).sum()) == 5
    assert {3, 17} <= set(index.tolist()) and torch.equal(index[local], labels)
    used = index[index >= 0]
    torch.manual_seed(1)
    loss = head(features, labels).loss
    loss.backward()
    cos = F.normalize(features.detach(), dim=1) @ F.normalize(head.weight[used], dim=1).T
    expected = margin_cross_entropy(cos, torch.searchsorted(used, labels), head.margin)
    torch.testing.assert_close(loss, expected)
    touched = head.weight.grad.abs().sum(dim=1).nonzero().flatten()
    assert set(touched.tolist()) <= set(used.tolist())


@pytest.mark.parametrize("batch", [4, 8])  # B <= r·N and B > r·N
def test_partialfc_step_needs_no_host_sync(batch: int) -> None:
    """No op in the forward or backward has a data-dependent output size (torch.unique,
    nonzero, boolean indexing) or reads a value back: on CUDA each would wait for the GPU.
    CUDA's sync debug mode cannot run on a CPU; FakeTensorMode refuses exactly those ops."""
    with FakeTensorMode():
        head = _build("partialfc", num_classes=50, sample_rate=0.1)
        features = torch.randn(batch, 2, requires_grad=True)
        head(features, torch.randint(0, 50, (batch,))).loss.backward()
        assert head.weight.grad.shape == (50, 2)


def test_partialfc_full_rate_equals_fc() -> None:
    torch.manual_seed(0)
    fc, pfc = _build("fc", num_classes=7), _build("partialfc", num_classes=7, sample_rate=1.0)
    pfc.load_state_dict(fc.state_dict())
    features, labels = torch.randn(2, 2), torch.tensor([1, 5])
    torch.testing.assert_close(fc(features, labels).loss, pfc(features, labels).loss)


def test_build_head_names_and_errors() -> None:
    assert set(HEADS) == {"attfc", "fc", "partialfc"}
    with pytest.raises(ValueError, match="unknown head"):
        _build("arcfc", num_classes=4)
    with pytest.raises(ValueError, match="feature_encoder"):
        _build("attfc", num_classes=4)
    for name in ("fc", "partialfc"):
        head = _build(name, num_classes=4)
        head.after_optimizer_step(nn.Linear(1, 1))  # no-op for trained heads
        assert head.weight.shape == (4, 2)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_has_what_the_loop_asks_of_it(name) -> None:
    """The Head protocol's members, on one process: nothing split, no stat unknown."""
    head = _build(name, num_classes=4, feature_encoder=nn.Linear(2, 2))
    assert isinstance(head, Head)
    assert head.num_classes == 4 and head.weight_rows is None


def _dense_reference(f_unit, positive, centers, center_labels, labels, slots, scale):
    logits = scale * f_unit @ centers.t()
    same = center_labels[None, :] == labels[:, None]
    logits = logits.masked_fill(same, float("-inf"))
    rows = torch.arange(len(labels))
    logits = logits.index_put((rows, slots), positive)
    return F.cross_entropy(logits, slots), int(same.sum()) - len(labels)


@pytest.mark.parametrize(("chunk", "scale"), [(1, 16.0), (3, 16.0), (5, 64.0), (64, 64.0),
                                               (1, 100.0), (4, 100.0)])
def test_chunked_loss_and_gradient_match_dense(chunk: int, scale: float) -> None:
    # s = 100 takes the running-max (online log-sum-exp) path, s ≤ 64 the unshifted one
    torch.manual_seed(0)
    batch, dim, size = 6, 5, 13
    margin = build_margin("arcface", s=scale)
    centers = F.normalize(torch.randn(size, dim), dim=1)
    center_labels = torch.randint(0, 4, (size,))
    labels = torch.randint(0, 4, (batch,))
    slots = torch.randperm(size)[:batch]
    center_labels[slots] = labels  # each own w⁺ is in the container (push before loss)
    features = torch.randn(batch, dim, requires_grad=True)

    def run(fn):
        f_unit = F.normalize(features, dim=1)
        positive = margin((f_unit * centers[slots]).sum(dim=1))
        loss, masked = fn(f_unit, positive)
        (grad,) = torch.autograd.grad(loss, features)
        return loss, int(masked), grad

    got = run(lambda f, p: masked_dcc_cross_entropy(f, p, centers, center_labels, labels,
                                                    margin.scale, chunk))
    ref = run(lambda f, p: _dense_reference(f, p, centers, center_labels, labels, slots,
                                            margin.scale))
    torch.testing.assert_close(got[0], ref[0])
    assert got[1] == ref[1] > 0
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-5)


def _heads_with(margin_name: str) -> dict[str, nn.Module]:
    """Each head with a fresh norm-aware margin (attfc's class encoder is Flatten)."""
    return {name: build_head(name, num_classes=6, embedding_size=2, batch_size=3,
                             margin=build_margin(margin_name), feature_encoder=nn.Flatten(),
                             sample_rate=1.0, k=2) for name in HEADS}


def _forward(head: nn.Module, features: torch.Tensor, labels: torch.Tensor):
    class_images = features.detach()[:, None, :].expand(-1, 2, -1).contiguous()
    return head(features, labels, class_images if head.needs_class_images else None)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_feeds_adaface_its_norms(name: str) -> None:
    # norms 10, 20, 30 (before normalisation): mean 20, std 10, so after one training
    # step μ = 0.01·20 + 0.99·20 = 20, σ = 0.01·10 + 0.99·100 = 99.1
    torch.manual_seed(0)
    head = _heads_with("adaface")[name]
    features = torch.tensor([[6.0, 8.0], [0.0, 20.0], [-18.0, 24.0]], requires_grad=True)
    out = _forward(head, features, torch.tensor([0, 1, 2]))
    assert (head.margin.norm_mean.item(), head.margin.norm_std.item()) == pytest.approx(
        (20.0, 99.1))
    assert out.stats["feature_norm"].item() == pytest.approx(20.0)
    assert {"margin.norm_mean", "margin.norm_std"} <= set(head.state_dict())  # checkpointed
    out.loss.backward()
    assert torch.isfinite(features.grad).all()
    head.eval()
    _forward(head, features, torch.tensor([0, 1, 2]))  # not in training: no EMA step
    assert head.margin.norm_std.item() == pytest.approx(99.1)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_adds_the_magface_regulariser_and_logs_it(name: str) -> None:
    torch.manual_seed(0)
    head = _heads_with("magface")[name]
    features = torch.tensor([[6.0, 8.0], [0.0, 60.0], [-66.0, 88.0]], requires_grad=True)
    out = _forward(head, features, torch.tensor([0, 1, 2]))
    # norms 10, 60, 110: 35·mean(1/a + a/110²) = 35·(0.100826 + 0.021625 + 0.018182)/3
    assert out.stats["magface_g"].item() == pytest.approx(35 * 0.140633 / 3, abs=1e-4)
    plain = _heads_with("magface")[name]
    plain.load_state_dict(head.state_dict())
    plain.margin.lambda_g = 0.0
    if name == "attfc":  # the same container as before the first forward's push
        plain.dcc.labels.fill_(-1)
        plain.dcc.ptr.zero_()
        torch.manual_seed(0)
        plain.dcc.centers.copy_(_heads_with("magface")["attfc"].dcc.centers)
    torch.manual_seed(0)
    again = _forward(plain, features, torch.tensor([0, 1, 2]))
    assert out.loss.item() == pytest.approx(again.loss.item() + out.stats["magface_g"].item(),
                                            rel=1e-6)
