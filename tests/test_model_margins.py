"""Margins (Eq. 2): values at known angles, fallback past π, finiteness at θ≈0 and θ≈π, fp32."""

from __future__ import annotations

import math

import pytest
import torch

from model.margins import CombinedMargin, build_margin


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
