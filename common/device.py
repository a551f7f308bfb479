"""Device choice shared by train and evaluate: the GPU when there is one; the usable cores."""

from __future__ import annotations

import os

from common.errors import UserError


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_device(name: str = "auto") -> str:
    """Map ``auto|cpu|cuda|cuda:N`` to a concrete torch device string, with a clear error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        return name
    raise UserError(f"--device {name}: expected auto, cpu or cuda[:N]")


def apply_tf32_policy() -> None:
    """The one float32 policy on CUDA, for training, evaluation and every bench alike:
    matmuls and cuDNN convolutions in TF32 (fp32's range, a 10-bit mantissa, tensor cores).

    One policy so a bench times what the product runs and validation during training scores
    what ``python -m evaluate`` scores. TF32 keeps as many mantissa bits as the fp16 logits
    of arcface_torch's heads, with fp32's range. Set through the legacy flags: torch refuses
    a read of them after the newer ``fp32_precision`` setters, and torch.compile reads them.
    CPU math is untouched.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
