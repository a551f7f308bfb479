"""Margins for the positive logit (Eq. 2): ArcFace, CosFace, the combined form, AdaFace, MagFace.

A margin module maps the positive cosine ``cos θ`` [B] (and, for the norm-aware ones, each
sample's feature norm before normalisation) to the scaled positive logit ``s·ψ(θ)``.
Negatives keep ``s·cos θ``; the heads read ``margin.scale`` for them. The math runs in fp32
whatever the autocast dtype, because acos near ±1 and the s=64 scale overflow fp16.

- ArcFace, CosFace, combined: ψ(θ) = cos(m1·θ + m2) − m3 with (1, m, 0), (1, 0, m) and any
  (m1, m2, m3) (insightface's combined margin).
- AdaFace (Kim et al., CVPR 2022): ψ = cos(θ − m·ẑ) − (m + m·ẑ), ẑ = clip(h·(‖f‖ − μ)/(σ + ε),
  −1, 1) with μ, σ the batch mean and std of the norms as an EMA (α); no gradient through ẑ.
- MagFace (Meng et al., CVPR 2021): ψ = cos(θ + m(a)), a = ‖f‖ clipped to [l_a, u_a],
  m(a) linear from l_m at l_a to u_m at u_a, plus λ_g·g(a), g(a) = 1/a + a/u_a², in the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from model.names import MARGINS
from model.precision import at_least_fp32

# acos has an infinite slope at ±1; clamping keeps forward and backward finite.
_COS_EPS = 1e-6


class Margin(nn.Module):
    """What a head asks of a margin: ``scale``, the positive logit, and any loss terms of its own.

    ``uses_norms``: the head passes each sample's feature norm (before normalisation) to
    :meth:`forward` and :meth:`loss_terms`, and the global batch's norms to :meth:`observe`
    once per training step, before the forward.
    """

    uses_norms: ClassVar[bool] = False
    scale: float

    def forward(self, cos_target: torch.Tensor, norms: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Positive cosines [B] (any dtype) and norms [B] -> scaled positive logits [B], fp32."""
        raise NotImplementedError

    def observe(self, batch_norms: torch.Tensor) -> None:
        """Take the training batch's feature norms into the margin's statistics (if any)."""

    def loss_terms(self, norms: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named scalars added to the head's loss and logged apart (none by default)."""
        return {}

    def stats(self, norms: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named scalars logged beside the loss (none by default)."""
        return {}


def _need_norms(norms: torch.Tensor | None, name: str) -> torch.Tensor:
    if norms is None:
        raise ValueError(f"the {name} margin needs each sample's feature norm")
    return at_least_fp32(norms)


class CombinedMargin(Margin):
    """s·(cos(m1·θ + m2) − m3) for the positive class.

    Where m1·θ + m2 would pass π, cos(·) turns back up and the "margin" would reward
    larger angles; beyond that threshold θ_t = (π − m2)/m1 we use the monotone fallback
    cos θ − cos θ_t − 1 − m3, which is continuous at θ_t (value −1 − m3).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0) -> None:
        super().__init__()
        if s <= 0 or m1 <= 0:
            raise ValueError(f"margin needs s > 0 and m1 > 0, got s={s}, m1={m1}")
        self.scale = float(s)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self._theta_t = (math.pi - self.m2) / self.m1

    def extra_repr(self) -> str:
        return f"s={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}"

    def forward(self, cos_target: torch.Tensor, norms: torch.Tensor | None = None
                ) -> torch.Tensor:
        with torch.autocast(device_type=cos_target.device.type, enabled=False):
            cos = at_least_fp32(cos_target)
            if self.m1 == 1.0 and self.m2 == 0.0:
                psi = cos - self.m3  # CosFace: no angle needed
            else:
                theta = torch.acos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))
                psi = torch.cos(self.m1 * theta + self.m2) - self.m3
                if self._theta_t < math.pi:
                    fallback = cos - math.cos(self._theta_t) - 1.0 - self.m3
                    psi = torch.where(theta <= self._theta_t, psi, fallback)
            return psi * self.scale


def shifted_cosine(cos: torch.Tensor, m2: torch.Tensor, m3: torch.Tensor | float
                   ) -> torch.Tensor:
    """cos(θ + m2) − m3 with a margin per sample (fp32 [B]).

    The angle is floored at 0 (a negative m2 must not turn cos back down near θ = 0), and
    beyond θ_t = π − m2 the monotone fallback cos θ − cos θ_t − 1 − m3 of
    :class:`CombinedMargin` applies, continuous at θ_t.
    """
    theta = torch.acos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))
    angle = theta + m2
    psi = torch.cos(angle.clamp(min=0.0)) - m3
    fallback = cos + torch.cos(m2) - 1.0 - m3  # cos θ_t = cos(π − m2) = −cos m2
    return torch.where(angle <= math.pi, psi, fallback)


class AdaFaceMargin(Margin):
    """AdaFace's quality-adaptive margin; the norm statistics μ, σ are buffers (checkpointed).

    Defaults are the paper's (m = 0.4, h = 0.333, α = 0.01); μ and σ start at 20 and 100 and
    ε = 1e-3, as its reference code. The EMA skips a batch of one (no std) and one whose
    mean or std is not finite (a non-finite step must not poison it).
    """

    uses_norms = True

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, alpha: float = 0.01,
                 eps: float = 1e-3) -> None:
        super().__init__()
        if s <= 0 or h <= 0 or not 0 < alpha <= 1:
            raise ValueError(f"adaface needs s > 0, h > 0 and alpha in (0, 1], got s={s}, "
                             f"h={h}, alpha={alpha}")
        self.scale, self.m, self.h = float(s), float(m), float(h)
        self.alpha, self.eps = float(alpha), float(eps)
        self.register_buffer("norm_mean", torch.tensor(20.0))
        self.register_buffer("norm_std", torch.tensor(100.0))

    def extra_repr(self) -> str:
        return f"s={self.scale}, m={self.m}, h={self.h}, alpha={self.alpha}"

    @staticmethod
    def _safe(norms: torch.Tensor) -> torch.Tensor:
        return at_least_fp32(norms.detach()).clamp(0.001, 100.0)

    @torch.no_grad()
    def observe(self, batch_norms: torch.Tensor) -> None:
        """μ ← α·mean + (1 − α)·μ and σ ← α·std + (1 − α)·σ over the batch's norms."""
        if batch_norms.numel() < 2:  # one sample has no std
            return
        safe = self._safe(batch_norms)
        mean, std = safe.mean(), safe.std()
        usable = torch.isfinite(mean) & torch.isfinite(std)
        for ema, value in ((self.norm_mean, mean), (self.norm_std, std)):
            ema.copy_(torch.where(usable, self.alpha * value + (1.0 - self.alpha) * ema, ema))

    def quality(self, norms: torch.Tensor) -> torch.Tensor:
        """ẑ = clip(h·(‖f‖ − μ)/(σ + ε), −1, 1) per sample, without gradient."""
        z = (self._safe(norms) - self.norm_mean) / (self.norm_std + self.eps) * self.h
        return z.clamp(-1.0, 1.0)

    def forward(self, cos_target: torch.Tensor, norms: torch.Tensor | None = None
                ) -> torch.Tensor:
        with torch.autocast(device_type=cos_target.device.type, enabled=False):
            z = self.quality(_need_norms(norms, "adaface"))
            psi = shifted_cosine(at_least_fp32(cos_target), -self.m * z, self.m + self.m * z)
            return psi * self.scale

    def stats(self, norms: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"feature_norm": norms.detach().float().mean(),
                "adaface_norm_mean": self.norm_mean.clone(),
                "adaface_norm_std": self.norm_std.clone()}


class MagFaceMargin(Margin):
    """MagFace's magnitude-aware margin and regulariser; defaults are the paper's
    (l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35)."""

    uses_norms = True

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                 l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0) -> None:
        super().__init__()
        if s <= 0 or not 0 < l_a < u_a or l_m > u_m or lambda_g < 0:
            raise ValueError(f"magface needs s > 0, 0 < l_a < u_a, l_m <= u_m and "
                             f"lambda_g >= 0, got s={s}, l_a={l_a}, u_a={u_a}, l_m={l_m}, "
                             f"u_m={u_m}, lambda_g={lambda_g}")
        self.scale = float(s)
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)

    def extra_repr(self) -> str:
        return (f"s={self.scale}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, "
                f"u_m={self.u_m}, lambda_g={self.lambda_g}")

    def magnitude(self, norms: torch.Tensor) -> torch.Tensor:
        """a = ‖f‖ clipped to [l_a, u_a] (differentiable inside)."""
        return at_least_fp32(norms).clamp(self.l_a, self.u_a)

    def margin_of(self, a: torch.Tensor) -> torch.Tensor:
        """m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def forward(self, cos_target: torch.Tensor, norms: torch.Tensor | None = None
                ) -> torch.Tensor:
        with torch.autocast(device_type=cos_target.device.type, enabled=False):
            a = self.magnitude(_need_norms(norms, "magface"))
            return shifted_cosine(at_least_fp32(cos_target), self.margin_of(a), 0.0) * self.scale

    def loss_terms(self, norms: torch.Tensor) -> dict[str, torch.Tensor]:
        """λ_g·mean g(a), g(a) = 1/a + a/u_a²."""
        with torch.autocast(device_type=norms.device.type, enabled=False):
            a = self.magnitude(norms)
            return {"magface_g": self.lambda_g * (1.0 / a + a / self.u_a ** 2).mean()}

    def stats(self, norms: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"feature_norm": norms.detach().float().mean()}


# Name -> builder from (s, m, (m1, m2, m3), the margin's own keyword arguments); keys are
# model/names.py's MARGINS, in that order (a test checks).
MARGIN_BUILDERS: dict[str, Callable[..., Margin]] = {
    "arcface": lambda s, m, m123, **kw: CombinedMargin(s, 1.0, m, 0.0, **kw),
    "cosface": lambda s, m, m123, **kw: CombinedMargin(s, 1.0, 0.0, m, **kw),
    "adaface": lambda s, m, m123, **kw: AdaFaceMargin(s, **kw),
    "magface": lambda s, m, m123, **kw: MagFaceMargin(s, **kw),
    "combined": lambda s, m, m123, **kw: CombinedMargin(s, *m123, **kw),
}


def build_margin(name: str = "arcface", s: float = 64.0, m: float = 0.5, *,
                 m1: float = 1.0, m2: float = 0.3, m3: float = 0.2, **kwargs: Any) -> Margin:
    """A margin by name: arcface (1, m, 0) and cosface (1, 0, m) take ``m``; combined takes
    (m1, m2, m3); adaface and magface take their own keyword arguments (paper defaults)."""
    if name not in MARGIN_BUILDERS:
        raise ValueError(f"unknown margin {name!r}: expected one of {', '.join(MARGINS)}")
    try:
        return MARGIN_BUILDERS[name](s, m, (m1, m2, m3), **kwargs)
    except TypeError as error:
        raise ValueError(f"{error} (--margin-args {kwargs})") from None
