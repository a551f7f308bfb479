"""Torch backend: DataLoader worker processes decode whole steps with simplejpeg.

Why this shape: the per-image cost is what limits a CPU loader, so a worker gets a whole
step (all (k+1)·B image ids) and decodes each JPEG straight into one shared-memory batch
tensor (no per-image tensors, no pickled pixels: the parent maps the same pages). Flips are
done while decoding: a flipped image is decoded as BGR and each row's bytes are reversed,
which mirrors the pixels and turns BGR back into RGB in one contiguous pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_engine.loader import Batch, DataError, ImageSource, batch_from_pixels
from data_engine.sampler import EpochPlan, StepPlan


class _Steps:
    """The DataLoader's sampler: step plans, computed lazily in the parent."""

    def __init__(self, plan: EpochPlan, start_step: int) -> None:
        self.plan = plan
        self.start_step = start_step

    def __iter__(self) -> Iterator[StepPlan]:
        return self.plan.steps(self.start_step)

    def __len__(self) -> int:
        return len(self.plan) - self.start_step


class _StepDecoder(Dataset):
    """``dataset[step_plan]`` -> (plan, pixels NHWC uint8 [(k+1)·B,H,W,3], replaced, error)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __getitem__(self, step: StepPlan) -> tuple[StepPlan, torch.Tensor, int, str | None]:
        size = self.source.image_size
        ids = step.all_image_ids
        flips = step.all_flips
        pixels = _shared_uint8((len(ids), size, size, 3))
        out = pixels.numpy()
        scratch = np.empty((size, size * 3), np.uint8)
        replaced = 0
        try:
            for i, (image_id, flip) in enumerate(zip(ids.tolist(), flips.tolist())):
                data, was_bad = self.source.read(image_id)
                replaced += was_bad
                replaced += decode_into(out[i], scratch, data, flip, self.source, image_id)
        except DataError as error:  # returned, not raised: DataLoader would wrap the message
            return step, pixels, replaced, str(error)
        return step, pixels, replaced, None


def decode_into(out: np.ndarray, scratch: np.ndarray, data: bytes, flip: bool,
                 source: ImageSource, image_id: int) -> int:
    """Decode one image into ``out`` (HWC), mirrored when ``flip``; 1 if it was replaced."""
    import simplejpeg

    for attempt in range(2):
        try:
            if flip:
                simplejpeg.decode_jpeg(data, "BGR", buffer=scratch, strict=False)
                out.reshape(scratch.shape)[:] = scratch[:, ::-1]
            else:
                simplejpeg.decode_jpeg(data, "RGB", buffer=out, strict=False)
            return attempt
        except ValueError as error:
            if attempt:
                raise DataError(f"replacement for {source.where(image_id)} does not decode: "
                                f"{error}") from error
            data = source.replace(image_id, f"JPEG does not decode: {error}")
    raise AssertionError("unreachable")


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor allocated in shared memory, so sending it to the parent copies nothing."""
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel)
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _keep(item: tuple) -> tuple:
    """collate_fn: the worker already built the whole step."""
    return item


class TorchBatches:
    """Runs the DataLoader for one epoch and turns each decoded step into a :class:`Batch`."""

    def __init__(self, plan: EpochPlan, source: ImageSource, *, device: str,
                 workers: int) -> None:
        self.plan = plan
        self.source = source
        self.device = torch.device(device)
        self.workers = workers

    def run(self, start_step: int) -> Iterator[tuple[Batch, int]]:
        """(batch, images replaced in it) for each step from ``start_step``."""
        pin = self.device.type == "cuda"
        loader = DataLoader(_StepDecoder(self.source), batch_size=None,
                            sampler=_Steps(self.plan, start_step), collate_fn=_keep,
                            num_workers=self.workers, pin_memory=pin,
                            prefetch_factor=2 if self.workers else None)
        for step, pixels, replaced, error in loader:
            if error is not None:
                raise DataError(error)
            yield batch_from_pixels(step, pixels, self.device), replaced
