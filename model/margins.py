"""Angular margins for the positive logit (Eq. 2): ArcFace, CosFace and the combined form.

A margin module maps the positive cosine ``cos θ`` [B] to the scaled positive logit
``s·ψ(θ)``, with ψ(θ) = cos(m1·θ + m2) − m3 (ArcFace: (1, m, 0); CosFace: (1, 0, m)).
Negatives keep ``s·cos θ``; the heads read ``margin.scale`` for them. The math runs in fp32
whatever the autocast dtype, because acos near ±1 and the s=64 scale overflow fp16.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.names import MARGINS

# acos has an infinite slope at ±1; clamping keeps forward and backward finite.
_COS_EPS = 1e-6


class CombinedMargin(nn.Module):
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

    def forward(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Positive cosines [B] (any dtype) -> scaled positive logits [B] in fp32."""
        with torch.autocast(device_type=cos_target.device.type, enabled=False):
            cos = cos_target.float()
            if self.m1 == 1.0 and self.m2 == 0.0:
                psi = cos - self.m3  # CosFace: no angle needed
            else:
                theta = torch.acos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))
                psi = torch.cos(self.m1 * theta + self.m2) - self.m3
                if self._theta_t < math.pi:
                    fallback = cos - math.cos(self._theta_t) - 1.0 - self.m3
                    psi = torch.where(theta <= self._theta_t, psi, fallback)
            return psi * self.scale


# Name -> (m1, m2, m3) from the one margin m; keys are model/names.py's MARGINS, in that order
# (a test checks).
MARGIN_FORMS = {
    "arcface": lambda m: (1.0, m, 0.0),  # angular margin m
    "cosface": lambda m: (1.0, 0.0, m),  # additive cosine margin m
}


def build_margin(name: str = "arcface", s: float = 64.0, m: float = 0.5) -> CombinedMargin:
    """A named margin (arcface: (1, m, 0); cosface: (1, 0, m)); other (m1, m2, m3) forms are
    built with :class:`CombinedMargin` directly."""
    if name not in MARGIN_FORMS:
        raise ValueError(f"unknown margin {name!r}: expected one of {', '.join(MARGINS)}")
    return CombinedMargin(s, *MARGIN_FORMS[name](m))
