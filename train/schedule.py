"""Learning rate as a pure function of the global step.

A function (not a stateful scheduler object) makes resume trivial: the checkpoint's step
alone fixes the learning rate, so nothing can drift between a straight and a resumed run.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, total_steps: int, base_lr: float, warmup_steps: int = 0,
          min_lr: float = 0.0) -> float:
    """Linear warmup from ~0 to ``base_lr``, then cosine decay to ``min_lr`` at the end.

    ``step`` counts optimizer steps already taken (0 for the first step).
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
