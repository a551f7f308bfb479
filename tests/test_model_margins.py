"""Margins (Eq. 2, AdaFace, MagFace): values at known angles and norms, gradients, the norm
EMA, the fallback past θ_t, fp32."""

from __future__ import annotations

import math

import pytest
import torch

from model.margins import AdaFaceMargin, CombinedMargin, MagFaceMargin, build_margin


def _at(margin, theta: float) -> float:
    return margin(torch.tensor([math.cos(theta)])).item()


def test_arcface_value_at_60_degrees() -> None:
    # s·cos(θ + m) with θ = π/3, m = 0.5: 64·cos(1.547198) = 64·0.0235966 = 1.510181
    assert _at(build_margin("arcface", s=64.0, m=0.5), math.pi / 3) == pytest.approx(
        1.510181, abs=1e-4)


def test_cosface_value() -> None:
    # s·(cos θ − m) = 64·(0.5 − 0.35) = 9.6
    assert _at(build_margin("cosface", s=64.0, m=0.35), math.pi / 3) == pytest.approx(9.6, abs=1e-4)


def test_combined_value() -> None:
    # θ = π/2, (m1, m2, m3) = (1, 0.3, 0.2): cos(π/2 + 0.3) − 0.2 = −sin 0.3 − 0.2 = −0.495520
    margin = CombinedMargin(10.0, 1.0, 0.3, 0.2)
    assert _at(margin, math.pi / 2) == pytest.approx(-4.95520, abs=1e-4)
    # m1 = 2: cos(2·π/4 + 0.3) − 0.2 = −0.495520 as well
    margin2 = CombinedMargin(10.0, 2.0, 0.3, 0.2)
    assert _at(margin2, math.pi / 4) == pytest.approx(-4.95520, abs=1e-4)


def test_arcface_fallback_past_pi_is_monotone_and_continuous() -> None:
    # θ = π − 0.2 > π − m: cos θ − cos(π − m) − 1 = −0.980067 + 0.877583 − 1 = −1.102484
    margin = build_margin("arcface", s=1.0, m=0.5)
    assert _at(margin, math.pi - 0.2) == pytest.approx(-1.102484, abs=1e-4)
    thetas = torch.linspace(0.0, math.pi, 2001)
    values = margin(torch.cos(thetas))
    assert (values[1:] <= values[:-1] + 1e-5).all()  # never rewards a larger angle
    assert _at(margin, math.pi - 0.5 - 1e-4) == pytest.approx(-1.0, abs=1e-3)
    assert _at(margin, math.pi - 0.5 + 1e-4) == pytest.approx(-1.0, abs=1e-3)


@pytest.mark.parametrize("margin", [build_margin("arcface", m=0.5), build_margin("cosface", m=0.5),
                                    CombinedMargin(64.0, 1.2, 0.3, 0.1)],
                         ids=["arcface", "cosface", "combined"])
def test_finite_values_and_gradients_at_the_poles(margin: CombinedMargin) -> None:
    cos = torch.tensor([1.0, 1.0 - 1e-9, 0.9999999, -1.0, -1.0 + 1e-9, -0.9999999, 0.0],
                       requires_grad=True)
    out = margin(cos)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(cos.grad).all()


def test_fp32_under_autocast() -> None:
    margin = build_margin("arcface")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = margin(torch.tensor([0.3, 0.7], dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_unknown_margin() -> None:
    with pytest.raises(ValueError, match="unknown margin"):
        build_margin("sphereface")


def _adaface(mean: float, std: float) -> AdaFaceMargin:
    margin = AdaFaceMargin(s=1.0, m=0.4, h=0.333)
    margin.norm_mean.fill_(mean)
    margin.norm_std.fill_(std)
    return margin


def test_adaface_positive_logit() -> None:
    # μ = 20, σ + ε = 10: ẑ = 0.333·(‖f‖ − 20)/10 clipped to [−1, 1]; θ = π/3 (cos 0.5).
    # ψ = cos(θ − 0.4·ẑ) − (0.4 + 0.4·ẑ):
    #   ‖f‖ = 20: ẑ = 0      -> cos(π/3) − 0.4 = 0.1 (CosFace at m = 0.4)
    #   ‖f‖ = 30: ẑ = 0.333  -> cos(1.047198 − 0.1332) − 0.5332 = 0.077385
    #   ‖f‖ = 5:  ẑ = −0.4995 -> cos(1.047198 + 0.1998) − 0.2002 = 0.117970
    #   ‖f‖ = 60: ẑ = 1 (clipped) -> cos(1.047198 − 0.4) − 0.8 = −0.002223
    margin = _adaface(20.0, 10.0 - 1e-3)
    norms = torch.tensor([20.0, 30.0, 5.0, 60.0])
    out = margin(torch.full((4,), 0.5), norms)
    torch.testing.assert_close(out, torch.tensor([0.1, 0.077385, 0.117970, -0.002223]),
                               atol=1e-5, rtol=0)
    assert _at_norm(AdaFaceMargin(s=64.0), 0.5, 20.0) == pytest.approx(
        64 * (0.5 - 0.4), abs=1e-4)  # ẑ = 0 at the initial μ = 20


def _at_norm(margin, cos: float, norm: float) -> float:
    return margin(torch.tensor([cos]), torch.tensor([norm])).item()


def test_adaface_has_no_gradient_through_the_norm() -> None:
    norms = torch.tensor([5.0, 30.0], requires_grad=True)
    cos = torch.tensor([0.3, 0.6], requires_grad=True)
    _adaface(20.0, 10.0)(cos, norms).sum().backward()
    assert norms.grad is None
    assert torch.isfinite(cos.grad).all() and (cos.grad != 0).all()


def test_adaface_norm_statistics_ema() -> None:
    margin = AdaFaceMargin()  # μ = 20, σ = 100, α = 0.01
    margin.observe(torch.tensor([10.0, 20.0, 30.0]))  # mean 20, unbiased std 10
    assert (margin.norm_mean.item(), margin.norm_std.item()) == pytest.approx((20.0, 99.1))
    margin.observe(torch.tensor([2.0, 4.0]))  # mean 3, std √2
    # μ = 0.01·3 + 0.99·20 = 19.83; σ = 0.01·1.414214 + 0.99·99.1 = 98.123142
    assert margin.norm_mean.item() == pytest.approx(19.83, abs=1e-5)
    assert margin.norm_std.item() == pytest.approx(98.123142, abs=1e-4)
    margin.observe(torch.tensor([7.0]))  # one sample: no std, the EMA keeps its value
    margin.observe(torch.tensor([float("nan"), 3.0]))  # a non-finite step is not taken in
    assert margin.norm_mean.item() == pytest.approx(19.83, abs=1e-5)
    assert set(margin.state_dict()) == {"norm_mean", "norm_std"}  # checkpointed


def test_adaface_beyond_theta_t_and_near_zero() -> None:
    margin = _adaface(20.0, 1.0 - 1e-3)
    low, high = torch.tensor([1.0]), torch.tensor([100.0])  # ẑ = −1 and ẑ = 1 (clipped)
    # ẑ = −1: cos(θ + 0.4) − 0; θ = π − 0.1 is past θ_t = π − 0.4:
    # cos θ + cos 0.4 − 1 = −0.995004 + 0.921061 − 1 = −1.073943
    assert margin(torch.tensor([math.cos(math.pi - 0.1)]), low).item() == pytest.approx(
        -1.073943, abs=1e-5)
    # ẑ = 1: θ − 0.4 < 0 at θ = 0.2, the angle floors at 0: cos 0 − 0.8 = 0.2
    assert margin(torch.tensor([math.cos(0.2)]), high).item() == pytest.approx(0.2, abs=1e-5)
    thetas = torch.linspace(0.0, math.pi, 2001)
    for norms in (low, high):
        values = margin(torch.cos(thetas), norms.expand(len(thetas)))
        assert (values[1:] <= values[:-1] + 1e-5).all()


def test_magface_positive_logit_and_its_gradient_wrt_the_norm() -> None:
    # a = 60: m(a) = 0.45 + (0.8 − 0.45)/(110 − 10)·(60 − 10) = 0.625; θ = π/3:
    # ψ = cos(1.047198 + 0.625) = −0.101228; ∂ψ/∂a = −sin(1.672198)·0.0035 = −0.003482
    margin = MagFaceMargin(s=1.0)
    norms = torch.tensor([60.0, 5.0, 200.0], requires_grad=True)
    out = margin(torch.full((3,), 0.5), norms)
    # a clipped: 5 -> 10 (m = 0.45), 200 -> 110 (m = 0.8)
    expected = [-0.101228, math.cos(math.pi / 3 + 0.45), math.cos(math.pi / 3 + 0.8)]
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-5, rtol=0)
    out.sum().backward()
    torch.testing.assert_close(norms.grad, torch.tensor([-0.003482, 0.0, 0.0]), atol=1e-6,
                               rtol=0)


def test_magface_regulariser_and_its_gradient() -> None:
    # λ_g·g(a) = 35·(1/60 + 60/110²) = 35·0.0216253 = 0.756887;
    # ∂/∂a = 35·(−1/60² + 1/110²) = −0.006830
    margin = MagFaceMargin()
    norms = torch.tensor([60.0], requires_grad=True)
    term = margin.loss_terms(norms)["magface_g"]
    assert term.item() == pytest.approx(0.756887, abs=1e-5)
    term.backward()
    assert norms.grad.item() == pytest.approx(-0.006830, abs=1e-6)
    # a mean over the batch: 0.756887 and, for a = 110, 35·(1/110 + 1/110) = 0.636364
    both = margin.loss_terms(torch.tensor([60.0, 110.0]))["magface_g"]
    assert both.item() == pytest.approx((0.756887 + 0.636364) / 2, abs=1e-5)


def test_magface_beyond_theta_t() -> None:
    # a = 110: m = 0.8, θ_t = π − 0.8; θ = π − 0.2: cos θ − cos θ_t − 1
    # = −0.980067 + 0.696707 − 1 = −1.283360, continuous (−1) at θ_t
    margin = MagFaceMargin(s=1.0)
    assert _at_norm(margin, math.cos(math.pi - 0.2), 110.0) == pytest.approx(-1.283360, abs=1e-5)
    for theta in (math.pi - 0.8 - 1e-4, math.pi - 0.8 + 1e-4):
        assert _at_norm(margin, math.cos(theta), 110.0) == pytest.approx(-1.0, abs=1e-3)
    thetas = torch.linspace(0.0, math.pi, 2001)
    values = margin(torch.cos(thetas), torch.full_like(thetas, 110.0))
    assert (values[1:] <= values[:-1] + 1e-5).all()


def test_combined_from_build_margin() -> None:
    # insightface's form cos(m1·θ + m2) − m3, here (1, 0.3, 0.2) at θ = π/2: −4.95520 at s = 10
    margin = build_margin("combined", s=10.0, m1=1.0, m2=0.3, m3=0.2)
    assert _at(margin, math.pi / 2) == pytest.approx(-4.95520, abs=1e-4)
    with pytest.raises(ValueError, match="unexpected keyword argument 'h'"):
        build_margin("arcface", h=0.3)


@pytest.mark.parametrize("name", ["adaface", "magface"])
def test_norm_aware_margins_in_fp32_under_autocast(name: str) -> None:
    margin = build_margin(name)
    cos = torch.tensor([0.3, 0.7], dtype=torch.bfloat16)
    norms = torch.tensor([15.0, 41.0], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = margin(cos, norms)
        terms = margin.loss_terms(norms)
    assert out.dtype == torch.float32
    assert all(term.dtype == torch.float32 for term in terms.values())
    torch.testing.assert_close(out, margin(cos.float(), norms.float()))
    with pytest.raises(ValueError, match="feature norm"):
        margin(cos)
