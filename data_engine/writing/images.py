"""Decide, per source file, whether it is stored as is, converted to a 112x112 JPEG, or rejected.

Valid aligned JPEGs are the common case on 42M-image datasets, so they are checked by parsing
markers only (a few microseconds) and stored byte for byte; PIL is touched only for the rare
file that needs conversion or a closer look.
"""

from __future__ import annotations

import io
import struct
from typing import NamedTuple

import simplejpeg
from PIL import Image, UnidentifiedImageError

IMAGE_SIZE = 112
VERIFY_LEVELS = ("none", "header", "full")
ON_MISMATCH = ("resize", "reject")
CONVERT_QUALITY = 95

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT
# (C4), JPG (C8) or DAC (CC), which share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])
_SOS = 0xDA


class RejectedImageError(Exception):
    """A file that is not stored; the message is the reason written to rejected.tsv."""


class JpegInfo(NamedTuple):
    width: int
    height: int
    components: int


_STORABLE = JpegInfo(IMAGE_SIZE, IMAGE_SIZE, 3)  # stored byte for byte
_SEGMENT = struct.Struct(">BBH")  # 0xFF, marker, segment length
_FRAME = struct.Struct(">HHB")  # height, width, components (after the precision byte)


def jpeg_info(data: bytes) -> JpegInfo:
    """Size and channel count from the SOF marker, without decoding any pixels."""
    pos, end = 2, len(data)
    while True:
        if pos + 4 > end:
            raise RejectedImageError("truncated jpeg (no frame header)")
        fill, marker, length = _SEGMENT.unpack_from(data, pos)
        if fill != 0xFF:
            raise RejectedImageError(f"corrupt jpeg (no marker at byte {pos})")
        if marker in _SOF_MARKERS:
            if pos + 10 > end:
                raise RejectedImageError("truncated jpeg (frame header cut)")
            height, width, components = _FRAME.unpack_from(data, pos + 5)
            return JpegInfo(width, height, components)
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _NO_LENGTH_MARKERS:
            pos += 2
        elif marker == _SOS or marker == 0xD9:
            raise RejectedImageError("corrupt jpeg (no frame header before scan data)")
        elif length < 2:
            raise RejectedImageError(f"corrupt jpeg (bad segment length at byte {pos})")
        else:
            pos += 2 + length


def _has_eoi(data: bytes) -> bool:
    # Some encoders pad after EOI; accept EOI within a short zero-filled tail.
    return data.endswith(_EOI) or data.rstrip(b"\x00").endswith(_EOI)


def prepare(data: bytes, *, verify: str = "header",
            on_mismatch: str = "resize") -> tuple[bytes, bool]:
    """Return (jpeg bytes to store, converted?) or raise RejectedImageError with the reason.

    verify: "none" parses only the JPEG header (to learn the size); "header" also requires
    the end-of-image marker (catches truncated files); "full" also decodes the pixels.
    on_mismatch: what to do with anything that is not a 112x112 colour JPEG.
    """
    if not data:
        raise RejectedImageError("empty file")
    if data.startswith(_SOI):
        info = jpeg_info(data)
        if verify != "none" and not _has_eoi(data):
            raise RejectedImageError("truncated jpeg (no end-of-image marker)")
        if info == _STORABLE:
            if verify == "full":
                _decode_check(data)
            return data, False
        what = f"jpeg {info.width}x{info.height} with {info.components} channel(s)"
    else:
        what = "not a jpeg"
    if on_mismatch == "reject":
        raise RejectedImageError(f"{what}, expected a {IMAGE_SIZE}x{IMAGE_SIZE} colour jpeg "
                                 "(--on-mismatch reject)")
    return convert(data), True


def _decode_check(data: bytes) -> None:
    try:
        simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True)
    except ValueError as error:
        raise RejectedImageError(f"corrupt jpeg ({error})") from None


def convert(data: bytes) -> bytes:
    """Any PIL-readable image -> 112x112 RGB JPEG (resized, not cropped: aligned inputs)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or "image"
            try:
                image.load()
            except (OSError, SyntaxError, ValueError) as error:
                raise RejectedImageError(f"corrupt {kind.lower()} ({error})") from None
            try:
                rgb = image.convert("RGB")
            except (OSError, ValueError) as error:
                raise RejectedImageError(f"unsupported {kind.lower()} mode {image.mode} "
                                    f"({error})") from None
    except UnidentifiedImageError:
        raise RejectedImageError("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise RejectedImageError(f"corrupt image ({error})") from None
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=CONVERT_QUALITY)
    return out.getvalue()
