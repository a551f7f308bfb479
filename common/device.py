"""Device choice shared by train and evaluate: the GPU when there is one."""

from __future__ import annotations

from common.errors import UserError


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
