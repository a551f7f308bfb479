"""JPEG checks and conversion (data_engine.writing.images) and the deterministic tar writer."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from PIL import Image

from data_engine.writing.images import RejectedImageError, jpeg_info, prepare
from data_engine.writing.tarwriter import TarWriter
from tests.shard_helpers import jpeg, pil_bytes


def test_valid_jpeg_passes_byte_exact_at_every_level():
    data = jpeg(1)
    assert jpeg_info(data).width == 112 and jpeg_info(data).components == 3
    for verify in ("none", "header", "full"):
        stored, converted = prepare(data, verify=verify)
        assert stored is data and not converted


@pytest.mark.parametrize("data", [
    pil_bytes(1, "RGB", "PNG"), pil_bytes(2, "L", "JPEG"), pil_bytes(3, "CMYK", "JPEG"),
    pil_bytes(4, "RGBA", "PNG", size=(90, 140)), jpeg(5, (200, 200))])
def test_other_images_are_converted_or_rejected(data):
    stored, converted = prepare(data)
    assert converted
    with Image.open(io.BytesIO(stored)) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (112, 112))
    with pytest.raises(RejectedImageError, match="--on-mismatch reject"):
        prepare(data, on_mismatch="reject")


def test_truncation_needs_header_check():
    data = jpeg(6)[:-300]
    assert prepare(data, verify="none")[0] is data  # none trusts the file beyond its size
    with pytest.raises(RejectedImageError, match="truncated"):
        prepare(data, verify="header")


def test_corrupt_scan_data_needs_full_check():
    data = jpeg(7)
    broken = data[:-200] + b"\xff\xd3" * 50 + data[-100:]  # bogus restart markers
    assert prepare(broken, verify="header")[0] is broken
    with pytest.raises(RejectedImageError, match="corrupt"):
        prepare(broken, verify="full")


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty file"), (b"hello", "not an image"), (b"\xff\xd8\xff", "truncated jpeg"),
    (b"\xff\xd8\x00\x00\x00\x00", "corrupt jpeg")])
def test_reject_reasons(data, reason):
    with pytest.raises(RejectedImageError, match=reason):
        prepare(data)


def test_tar_writer_is_deterministic_and_standard(tmp_path):
    members = [("00000000.0000.jpg", jpeg(8)), ("00000000.cls", b"0"), ("x" * 100, b"")]
    results = []
    for name in ("a.tar", "b.tar"):
        writer = TarWriter(tmp_path / name)
        offsets = [writer.add(member, data) for member, data in members]
        results.append((writer.close(), offsets, (tmp_path / name).read_bytes()))
    assert results[0] == results[1]
    (size, sha), offsets, raw = results[0]
    assert size == len(raw) and size % 10240 == 0
    assert sha == hashlib.sha256(raw).hexdigest()
    with tarfile.open(tmp_path / "a.tar") as archive:
        for info, (name, data), offset in zip(archive.getmembers(), members, offsets):
            assert (info.name, info.size, info.offset_data, info.mtime) == (
                name, len(data), offset, 0)
            assert archive.extractfile(info).read() == data
