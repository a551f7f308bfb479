"""What every head's forward returns, so ``train`` can swap heads with a flag."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class HeadOutput:
    """Scalar loss plus logging stats kept as tensors (``.item()`` would sync every step)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
