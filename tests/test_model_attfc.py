"""AttFC pieces against small hand-computed numbers (Eq. 8-12, Alg. 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.heads import build_head
from model.heads.attfc import (
    DynamicClassContainer,
    attention_weights,
    dcc_capacity,
    generate_gcc,
)
from model.margins import build_margin

E = math.e


def test_attention_weights_and_gcc_eq8_eq9() -> None:
    # cos(f, K1) = 1, cos(f, K2) = 0 -> α = softmax([1, 0]) = [e/(e+1), 1/(e+1)]
    f = torch.tensor([[1.0, 0.0]])
    K = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    a1, a2 = E / (E + 1), 1 / (E + 1)
    torch.testing.assert_close(attention_weights(f, K), torch.tensor([[a1, a2]]))
    # w⁺ = α1·K1 + α2·K2 = [0.731059, 2·0.268941]: K is used as is (not normalised), Eq. 9
    torch.testing.assert_close(generate_gcc(f, K)[0], torch.tensor([[a1, 2 * a2]]))


def test_attention_three_dims() -> None:
    # f = [1, 1, 0]; K1 = [1, 0, 0] (cos 1/√2), K2 = [0, 0, 3] (cos 0), K3 = [2, 2, 0] (cos 1)
    f = torch.tensor([[1.0, 1.0, 0.0]])
    K = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0], [2.0, 2.0, 0.0]]])
    e = [math.exp(1 / math.sqrt(2)), 1.0, E]
    alpha = [x / sum(e) for x in e]
    torch.testing.assert_close(attention_weights(f, K), torch.tensor([alpha]))
    expected = [alpha[0] + 2 * alpha[2], 2 * alpha[2], 3 * alpha[1]]
    torch.testing.assert_close(generate_gcc(f, K)[0], torch.tensor([expected]))


def test_constant_and_single_strategies() -> None:
    f = torch.tensor([[1.0, 0.0]])
    K = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    torch.testing.assert_close(generate_gcc(f, K, "constant")[0], torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(generate_gcc(f, K, "single")[0], torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="strategy"):
        generate_gcc(f, K, "median")


def test_gcc_is_fp32_under_autocast() -> None:
    """Autocast runs einsum's matmul in bf16 (on the CPU as on CUDA); the GCC must not."""
    torch.manual_seed(0)
    f, K = torch.randn(4, 8), torch.randn(4, 2, 8)
    plain, alpha = generate_gcc(f, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, mixed_alpha = generate_gcc(f, K)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain) and torch.equal(mixed_alpha, alpha)


def test_capacity_rounds_down_to_a_multiple_of_b() -> None:
    assert dcc_capacity(93431, 0.3, 384) == 27648  # paper Table 2, MS1MV3
    assert dcc_capacity(1029950, 0.3, 384) == 308736  # paper Table 2, WebFace21M
    assert dcc_capacity(10, 0.3, 8) == 8  # never below one batch


def test_dcc_fifo_order_and_wraparound() -> None:
    dcc = DynamicClassContainer(5, 2)
    assert dcc.labels.tolist() == [-1] * 5
    torch.testing.assert_close(dcc.centers.norm(dim=1), torch.ones(5))
    pushes = [([[1, 0], [2, 0]], [10, 11]), ([[3, 0], [4, 0]], [12, 13]),
              ([[5, 0], [6, 0]], [14, 15])]
    slots = [dcc.push(torch.tensor(c, dtype=torch.float32), torch.tensor(y)).tolist()
             for c, y in pushes]
    assert slots == [[0, 1], [2, 3], [4, 0]]  # the oldest (slot 0) is replaced first
    assert dcc.labels.tolist() == [15, 11, 12, 13, 14]
    assert dcc.centers[:, 0].tolist() == [6, 2, 3, 4, 5]
    assert dcc.ptr.item() == 1
    with pytest.raises(ValueError, match="capacity"):
        dcc.push(torch.zeros(6, 2), torch.zeros(6, dtype=torch.long))


def _flat_head(capacity_classes: int, batch: int, **kw) -> nn.Module:
    """attfc head whose class encoder is Flatten: class 'images' [B,k,D,1,1] are K itself."""
    kw.setdefault("margin", build_margin("arcface", s=2.0, m=0.5))
    return build_head("attfc", num_classes=capacity_classes, embedding_size=2, batch_size=batch,
                      feature_encoder=nn.Flatten(), sample_rate=0.4, **kw)


def _hand_eq10(f, K, dcc_before, labels_before, ptr, y, s=2.0, m=0.5):  # noqa: N803
    """Eq. 8-10 with plain Python floats: GCCs pushed at ptr (FIFO), then for each sample the
    softmax over its own w⁺ (margin logit) and all entries with another label."""
    centers = [list(c) for c in dcc_before]
    labels = list(labels_before)
    unit = [[x / math.hypot(*v) for x in v] for v in f]
    slots = []
    for i, (fi, Ki) in enumerate(zip(unit, K)):
        cos = [sum(a * b for a, b in zip(fi, k)) / math.hypot(*k) for k in Ki]
        alpha = [math.exp(c) / sum(math.exp(d) for d in cos) for c in cos]
        w = [sum(alpha[j] * Ki[j][d] for j in range(len(Ki))) for d in range(2)]
        slot = (ptr + i) % len(centers)
        centers[slot], labels[slot] = w, y[i]
        slots.append(slot)
    losses, masked = [], 0
    for i, fi in enumerate(unit):
        def cos_to(c, fi=fi):
            return sum(a * b for a, b in zip(fi, c)) / math.hypot(*c)
        positive = s * math.cos(math.acos(cos_to(centers[slots[i]])) + m)
        negatives = [s * cos_to(c) for c, lab in zip(centers, labels) if lab != y[i]]
        masked += sum(1 for lab in labels if lab == y[i]) - 1
        denom = math.exp(positive) + sum(math.exp(n) for n in negatives)
        losses.append(-math.log(math.exp(positive) / denom))
    return sum(losses) / len(losses), masked, slots, centers, labels


def test_loss_equals_hand_eq10_with_conflicts_from_this_and_earlier_batches() -> None:
    head = _flat_head(15, 2)  # S = 0.4·15 = 6
    assert head.dcc.capacity == 6
    before = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0], [0.8, -0.6]]
    labels_before = [7, 3, -1, -1, 9, -1]  # slot 1 holds label 3 from an earlier batch
    head.dcc.centers.copy_(torch.tensor(before))
    head.dcc.labels.copy_(torch.tensor(labels_before))
    head.dcc.ptr.fill_(2)
    f = [[1.0, 0.5], [0.3, -1.0]]
    K = [[[1.0, 1.0], [2.0, -0.5]], [[0.2, -1.0], [-0.5, -0.7]]]
    y = [3, 3]  # same label twice in this batch, and slot 1 from before: 2 conflicts each
    out = head(torch.tensor(f), torch.tensor(y), torch.tensor(K)[..., None, None])
    loss, masked, slots, centers, labels = _hand_eq10(f, K, before, labels_before, 2, y)
    assert masked == 4
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    assert out.stats["masked_conflicts"].item() == masked
    # push happened before the logits: the batch's own GCCs sit at slots 2, 3 with labels
    assert head.dcc.labels.tolist() == labels == [7, 3, 3, 3, 9, -1]
    unit = F.normalize(torch.tensor([centers[s] for s in slots]), dim=1)
    torch.testing.assert_close(head.dcc.centers[slots], unit)
    assert head.dcc.ptr.item() == 4


def test_own_wplus_is_the_positive_not_masked() -> None:
    # A lone sample whose label is nowhere else: nothing masked, and the loss uses its own
    # GCC as the positive; masking it would drop the positive logit and change the loss.
    head = _flat_head(15, 2)
    before = head.dcc.centers.tolist()
    f, K, y = [[1.0, 0.2], [0.0, 1.0]], [[[1.0, 0.0], [1.0, 0.1]], [[0.1, 1.0], [0.0, 1.0]]], [4, 5]
    out = head(torch.tensor(f), torch.tensor(y), torch.tensor(K)[..., None, None])
    loss, masked, *_ = _hand_eq10(f, K, before, [-1] * 6, 0, y)
    assert masked == 0 and out.stats["masked_conflicts"].item() == 0
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)


def test_head_fifo_wraps_with_returned_slots() -> None:
    head = _flat_head(15, 2)
    seen = []
    for step in range(4):
        y = torch.tensor([2 * step, 2 * step + 1])
        head(torch.randn(2, 2), y, torch.randn(2, 2, 2, 1, 1))
        seen.append(head.dcc.labels.tolist())
    assert seen[2] == [0, 1, 2, 3, 4, 5]
    assert seen[3] == [6, 7, 2, 3, 4, 5]  # the oldest batch (labels 0, 1) left first


def test_attention_spread_stat() -> None:
    head = _flat_head(15, 2, strategy="attention")
    K = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 2.0]]])[..., None, None]
    out = head(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]), K)
    # max α − min α = (e − 1)/(e + 1) for both samples
    assert out.stats["attention_spread"].item() == pytest.approx((E - 1) / (E + 1), rel=1e-5)


def test_single_strategy_encodes_only_the_first_class_image() -> None:
    calls = []
    encoder = nn.Flatten()
    encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    head = build_head("attfc", num_classes=15, embedding_size=2, batch_size=2,
                      margin=build_margin("arcface"), feature_encoder=encoder, sample_rate=0.4,
                      strategy="single")
    K = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [3.0, 0.0]]])[..., None, None]
    head(torch.randn(2, 2), torch.tensor([0, 1]), K)
    assert calls == [2]  # B·1 images through the class encoder, not B·k
    torch.testing.assert_close(head.dcc.centers[:2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


class _Tiny(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))


def _tiny_setup(gamma: float = 0.9):
    torch.manual_seed(0)
    encoder = _Tiny()
    head = build_head("attfc", num_classes=40, embedding_size=4, batch_size=4,
                      margin=build_margin("arcface", s=8.0), feature_encoder=encoder,
                      class_encoder_momentum=gamma)
    return encoder, head


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(4, 3, 2, 2, generator=g), torch.randint(0, 40, (4,), generator=g),
            torch.randn(4, 2, 3, 2, 2, generator=g))


def test_gradients_reach_the_feature_encoder_only() -> None:
    encoder, head = _tiny_setup()
    images, labels, class_images = _batch(0)
    head(encoder(images), labels, class_images).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in encoder.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in head.class_encoder.parameters())
    assert not head.dcc.centers.requires_grad and head.dcc.centers.grad is None
    assert [p for p in head.parameters() if p.requires_grad] == []


def test_class_encoder_follows_eq12_after_a_step() -> None:
    encoder, head = _tiny_setup(gamma=0.9)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.5)
    images, labels, class_images = _batch(1)
    head(encoder(images), labels, class_images).loss.backward()
    opt.step()
    before = [p.clone() for p in head.class_encoder.parameters()]
    head.after_optimizer_step(encoder)
    for c_old, c_new, f in zip(before, head.class_encoder.parameters(), encoder.parameters()):
        assert not torch.equal(c_old, f)  # the step moved F away from C
        torch.testing.assert_close(c_new, 0.9 * c_old + 0.1 * f, rtol=0, atol=1e-7)
    # BN running stats are copied from F (our documented choice), not averaged
    assert torch.equal(head.class_encoder[2].running_mean, encoder[2].running_mean)
    assert torch.equal(head.class_encoder[2].num_batches_tracked, encoder[2].num_batches_tracked)


def test_state_dict_roundtrip_resumes_identically() -> None:
    encoder, head = _tiny_setup()
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1)
    for step in range(2):
        images, labels, class_images = _batch(step)
        head(encoder(images), labels, class_images).loss.backward()
        opt.step()
        opt.zero_grad()
        head.after_optimizer_step(encoder)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    assert {"dcc.centers", "dcc.labels", "dcc.ptr", "class_encoder.1.weight"} <= set(state)
    torch.manual_seed(123)  # a fresh head starts from another random container
    resumed = build_head("attfc", num_classes=40, embedding_size=4, batch_size=4,
                         margin=build_margin("arcface", s=8.0), feature_encoder=_Tiny())
    resumed.load_state_dict(state)
    images, labels, class_images = _batch(5)
    features = encoder(images).detach()
    a, b = head(features, labels, class_images), resumed(features, labels, class_images)
    assert torch.equal(a.loss, b.loss)
    for key, value in head.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_dcc_gives_close_loss(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    heads = {d: build_head("attfc", num_classes=8192, embedding_size=128, batch_size=32,
                           margin=build_margin("arcface"), feature_encoder=nn.Flatten(),
                           dcc_dtype=d, chunk_size=1000) for d in (torch.float32, dtype)}
    heads[dtype].load_state_dict(heads[torch.float32].state_dict())
    assert heads[dtype].dcc.centers.dtype == dtype
    losses = []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        features = torch.randn(32, 128, generator=g)
        K = (0.5 * features[:, None] + torch.randn(32, 2, 128, generator=g))[..., None, None]
        labels = torch.randint(0, 8192, (32,), generator=g)
        losses.append([heads[d](features, labels, K).loss.item() for d in heads])
    worst = max(abs(a - b) for a, b in losses)
    print(f"\n{dtype} DCC: losses {losses}, max |Δloss| vs fp32 = {worst:.2e}")
    assert worst < (2e-3 if dtype == torch.float16 else 2e-2)


def test_autocast_features_give_fp32_loss() -> None:
    head = _flat_head(15, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(2, 2).bfloat16(), torch.tensor([0, 1]),
                   torch.randn(2, 2, 2, 1, 1))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_attfc_needs_class_images() -> None:
    head = _flat_head(15, 2)
    assert head.needs_class_images
    with pytest.raises(ValueError, match="class_images"):
        head(torch.randn(2, 2), torch.tensor([0, 1]), None)


def test_channels_last_class_encoder_gets_nhwc_images() -> None:
    encoder = nn.Sequential(nn.Conv2d(3, 2, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder = encoder.to(memory_format=torch.channels_last)
    head = build_head("attfc", num_classes=15, embedding_size=2, batch_size=2,
                      margin=build_margin("arcface"), feature_encoder=encoder, sample_rate=0.4)
    seen = []
    head.class_encoder[0].register_forward_pre_hook(
        lambda mod, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    head(torch.randn(2, 2), torch.tensor([0, 1]), torch.randn(2, 2, 3, 4, 4))
    assert seen == [True]
