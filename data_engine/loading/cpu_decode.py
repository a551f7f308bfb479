"""CPU JPEG decode of one step straight into a batch buffer (simplejpeg), mirrored on request.

Used by the torch backend's workers and by the DALI backend to name (or replace) an image
its decoder rejected, so both decode a bad step the same way.
"""

from __future__ import annotations

import numpy as np

from data_engine.loading.epoch_plan import StepPlan
from data_engine.loading.image_source import DataError, ImageSource


def decode_step(source: ImageSource, step: StepPlan, out: np.ndarray) -> tuple[int, str | None]:
    """Decode all images of ``step`` into ``out`` [(k+1)·B,H,W,3]: (replaced, error or None)."""
    scratch = np.empty((out.shape[1], out.shape[2] * 3), np.uint8)
    replaced = 0
    try:
        ids = step.all_image_ids
        encoded, replaced = source.read_many(ids)
        for i, (image_id, flip) in enumerate(zip(ids.tolist(), step.all_flips.tolist())):
            replaced += decode_into(out[i], scratch, encoded[i], flip, source, image_id)
    except DataError as error:  # sent as text: the parent raises it with the same message
        return replaced, str(error)
    return replaced, None


def decode_into(out: np.ndarray, scratch: np.ndarray, data: bytes, flip: bool,
                source: ImageSource, image_id: int) -> int:
    """Decode one image into ``out`` (HWC), mirrored when ``flip``; 1 if it was replaced."""
    import simplejpeg

    for attempt in range(2):
        try:
            if flip:
                simplejpeg.decode_jpeg(data, "BGR", buffer=scratch, strict=False)
                _reverse_rows(scratch, out.reshape(scratch.shape))
            else:
                simplejpeg.decode_jpeg(data, "RGB", buffer=out, strict=False)
            return attempt
        except ValueError as error:
            if attempt:
                raise DataError(f"replacement for {source.where(image_id)} does not decode: "
                                f"{error}") from error
            data = source.replace(image_id, f"JPEG does not decode: {error}")
    raise AssertionError("unreachable")


def _reverse_rows(src: np.ndarray, dst: np.ndarray) -> None:
    """dst = src with each row's bytes reversed (BGR rows -> mirrored RGB rows)."""
    if src.shape[1] % 8:
        dst[:] = src[:, ::-1]
        return
    # Reversing a row's bytes = reversing its 8-byte words, then each word's bytes: 8x fewer
    # strided elements than a byte-wise reverse, about twice as fast.
    words = dst.view(np.uint64)
    words[:] = src.view(np.uint64)[:, ::-1]
    words.byteswap(inplace=True)
