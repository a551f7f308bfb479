"""The heads' and margins' arithmetic dtype: fp32 at least, float64 kept."""

from __future__ import annotations

import torch


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in fp32, or as it is when it is float64.

    Training computes the heads in fp32 whatever autocast runs the backbone in; a float64
    model stays float64 throughout, so exactness tests can compare steps to 1e-10.
    """
    return tensor if tensor.dtype == torch.float64 else tensor.float()
