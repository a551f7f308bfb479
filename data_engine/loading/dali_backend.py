"""DALI backend: one pipeline decodes all (k+1)·B JPEGs of a step, on the GPU when there is one.

The main thread feeds the encoded bytes of a whole step through ``fn.external_source`` in
batch mode (a pread per image, ~5-10 µs); DALI's own threads or the GPU decoder do the heavy
part, and the pipeline prefetches the next steps while the model trains. Measured on the
2-core CPU box (B=384, k=2): batch mode 106 CPU-µs/image, a parallel external source with a
per-sample callable 137-142 (its worker processes and shared-memory hand-off cost more than
the preads they move off the main thread). Flip bits come
from the epoch plan as a second external source, so both backends flip the same images.
A step whose JPEG only fails inside DALI's decoder (entropy-coded data damaged, header
intact) is decoded again on the CPU with simplejpeg to name the image, then raised or,
with ``skip_bad``, replaced exactly as the torch backend replaces it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from data_engine.loading.batch import Batch, batch_from_pixels
from data_engine.loading.cpu_decode import decode_into
from data_engine.loading.epoch_plan import EpochPlan, StepPlan
from data_engine.loading.image_source import ImageSource


def decoder_options(gpu: bool, size: int) -> dict[str, Any]:
    """``fn.decoders.image`` arguments. EXIF orientation is ignored, as by the CPU decode, so
    both backends give the same pixels; the mixed decoder's threads are not pinned to cores
    (``affine``), which would stack every torchrun rank's threads on the same cores."""
    options: dict[str, Any] = {"output_type": types.RGB, "adjust_orientation": False}
    if not gpu:
        return {**options, "device": "cpu"}
    # jpeg_fancy_upsampling: chroma upsampled like libjpeg-turbo, so GPU pixels stay close
    # to the CPU decoders'.
    return {**options, "device": "mixed", "affine": False, "hw_decoder_load": 0.9,
            "preallocate_width_hint": size, "preallocate_height_hint": size,
            "jpeg_fancy_upsampling": True}


class _Feeder:
    """External-source callable: encoded bytes + flip bits of the next step, in plan order."""

    def __init__(self, plan: EpochPlan, source: ImageSource, start_step: int) -> None:
        self.source = source
        self.steps = plan.steps(start_step)
        self.pending: deque[tuple[StepPlan, list[np.ndarray], int]] = deque()

    def __call__(self) -> tuple[list[np.ndarray], np.ndarray]:
        step = next(self.steps)  # StopIteration here is DALI's end-of-epoch signal
        encoded, replaced = self.source.read_many(step.all_image_ids)
        data = [np.frombuffer(raw, np.uint8) for raw in encoded]
        self.pending.append((step, data, replaced))
        return data, step.all_flips.astype(np.int32)


class DaliBatches:
    """Builds a pipeline per pass (an epoch; again after a decoder error) and turns each
    output into a :class:`Batch`."""

    def __init__(self, source: ImageSource, *, device: str, workers: int) -> None:
        self.source = source
        self.device = torch.device(device)
        self.workers = workers

    def start(self, plan: EpochPlan) -> None:
        """Nothing to start ahead: a pipeline is built per pass."""

    def close(self) -> None:
        """Nothing outlives a pass: each pipeline is released with its pass."""

    def run(self, plan: EpochPlan, start_step: int) -> Iterator[tuple[Batch, int]]:
        """(batch, images replaced in it) for each step of ``plan`` from ``start_step``.

        After a decoder error the pipeline is dropped (an operator error can leave it
        invalid, and the steps it prefetched with it) and a new one starts at the next step.
        """
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this thread's copies go to our GPU
        next_step = start_step
        while next_step < len(plan):
            feeder = _Feeder(plan, self.source, next_step)
            pipe = self._pipeline(plan, feeder)
            while True:
                try:
                    (images,) = pipe.run()
                except StopIteration:
                    return
                except RuntimeError as error:  # the decoder rejected bytes that passed the checks
                    failed = error
                    break
                step, _, replaced = feeder.pending.popleft()
                yield batch_from_pixels(step, self._to_torch(images), self.device), replaced
            del pipe
            step, data, replaced = feeder.pending.popleft()
            pixels, extra = _decode_on_cpu(step, data, self.source, failed)
            next_step = step.step + 1
            yield batch_from_pixels(step, pixels, self.device), replaced + extra

    def _pipeline(self, plan: EpochPlan, feeder: _Feeder):
        size = self.source.image_size
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if gpu else None
        decoder = decoder_options(gpu, size)

        @pipeline_def(batch_size=(plan.k + 1) * plan.batch_size,
                      num_threads=max(1, self.workers), device_id=device_id,
                      prefetch_queue_depth=2, exec_dynamic=True)
        def decode_steps():
            jpegs, flips = fn.external_source(source=feeder, num_outputs=2, batch=True,
                                              dtype=[types.UINT8, types.INT32])
            images = fn.decoders.image(jpegs, **decoder)
            return fn.flip(images, horizontal=flips)

        pipe = decode_steps()
        pipe.build()
        return pipe

    def _to_torch(self, images) -> torch.Tensor:
        """Copy DALI's output (its buffers are reused) into a fresh NHWC uint8 tensor."""
        size = self.source.image_size
        out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(images.as_tensor(), out, cuda_stream=stream)
        return out


def _decode_on_cpu(step: StepPlan, data: list[np.ndarray], source: ImageSource,
                   error: RuntimeError) -> tuple[torch.Tensor, int]:
    """Redo a step DALI's decoder failed on: name the bad image, or replace it (skip_bad).

    simplejpeg in strict mode finds the culprit (data that decodes only with warnings, e.g.
    cut short); then the step is decoded on the CPU, exactly as the torch backend would.
    """
    import simplejpeg

    encoded = [array.tobytes() for array in data]
    replaced = 0
    for i, image_id in enumerate(step.all_image_ids.tolist()):
        try:
            simplejpeg.decode_jpeg(encoded[i], "RGB", strict=True)
        except ValueError as why:
            encoded[i] = source.replace(image_id, f"JPEG does not decode: {why}")
            replaced += 1
    if not replaced:  # every image decodes: not a data problem, keep DALI's error
        raise error
    size = source.image_size
    pixels = torch.empty((len(encoded), size, size, 3), dtype=torch.uint8)
    out = pixels.numpy()
    scratch = np.empty((size, size * 3), np.uint8)
    for i, (image_id, flip) in enumerate(zip(step.all_image_ids.tolist(),
                                             step.all_flips.tolist())):
        decode_into(out[i], scratch, encoded[i], flip, source, image_id)
    return pixels, replaced
