"""Per-image running statistics of how each photo scores as an AttFC class image.

Every step already computes, for each class image, its attention weight α (Eq. 8) and the
cosine between its class feature and the identity image's feature; summing them per image
id costs three ``index_add_`` on the device and no extra forward pass. A photo that shows
someone else, or too little of anyone, keeps a low cosine to its identity's other photos,
so the means rank images for ``python -m evaluate noise``. Read back (a host sync) only when
the loop writes RUN/image_stats.npz at checkpoints; the sums are in each checkpoint too, so a
resumed run continues them exactly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from common.files import write_atomic
from common.run_folder import IMAGE_STATS


class ImageStats:
    """Sums over class-image appearances: count, Σα and Σcos per image id (float64)."""

    def __init__(self, num_images: int, k: int, device: str) -> None:
        self.k = k
        self.count = torch.zeros(num_images, dtype=torch.float64, device=device)
        self.alpha_sum = torch.zeros_like(self.count)
        self.cos_sum = torch.zeros_like(self.count)

    @torch.no_grad()
    def add(self, class_image_ids: torch.Tensor, alpha: torch.Tensor, cos: torch.Tensor, *,
            counted: torch.Tensor) -> None:
        """Accumulate one step: ids [B, k], α and cos [B, k'] (k' = 1: the first image only).

        ``counted``: a device bool, False for a step the trainer skips (its scores may be
        NaN): then nothing is added, still without a host sync.
        """
        ids = class_image_ids[:, :alpha.shape[1]].reshape(-1).to(self.count.device)
        self.count.index_add_(0, ids, counted.double().expand(ids.shape))
        self.alpha_sum.index_add_(0, ids, torch.where(counted, alpha.detach(), 0).reshape(-1)
                                  .double())
        self.cos_sum.index_add_(0, ids, torch.where(counted, cos.detach(), 0).reshape(-1)
                                .double())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "alpha_sum": self.alpha_sum, "cos_sum": self.cos_sum}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def write(self, run_dir: Path) -> Path:
        """RUN/image_stats.npz: count, alpha_sum, cos_sum per image id, and k (syncs)."""
        path = Path(run_dir) / IMAGE_STATS
        arrays = {name: value.cpu().numpy() for name, value in self.state_dict().items()}
        buffer = io.BytesIO()
        np.savez(buffer, k=np.int64(self.k), **arrays)
        write_atomic(path, buffer.getvalue())
        return path
