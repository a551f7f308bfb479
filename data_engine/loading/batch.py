"""The batch type every loader backend returns: one training step's images, labels and ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_engine.loading.epoch_plan import StepPlan


@dataclass
class Batch:
    """One training step. Images are RGB uint8, already flipped, in channels-last memory.

    Shapes are NCHW (``identity [B,3,112,112]``, ``classes [B,k,3,112,112]``) but the
    storage is NHWC, as decoders write it: no transpose copy, and channels-last is the fast
    layout for convolutions on GPU. ``classes.flatten(0, 1)`` is a free view.
    """

    identity: torch.Tensor
    classes: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor
    class_image_ids: torch.Tensor


def batch_from_pixels(step: StepPlan, pixels: torch.Tensor, device: torch.device) -> Batch:
    """Views of one step's decoded NHWC pixels (identity rows first) as a :class:`Batch`."""
    batch_size, k = step.class_image_ids.shape
    nchw = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)

    def ids(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device, non_blocking=True)

    return Batch(identity=nchw[:batch_size],
                 classes=nchw[batch_size:].unflatten(0, (batch_size, k)),
                 labels=ids(step.labels), image_ids=ids(step.image_ids),
                 class_image_ids=ids(step.class_image_ids))
