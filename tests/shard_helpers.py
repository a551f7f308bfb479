"""Real input trees, an independent RecordIO writer and shard read-back checks for the
data_engine.shard tests (no mocks: files on disk, tars read by three readers)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import simplejpeg
import webdataset as wds
from PIL import Image

from synthetic.faces import encode_jpeg, render_face
from tests.helpers import assert_ok, run_module

REC_MAGIC = 0xCED7230A
# Image counts per identity of the face-folder shards, k=2: alone, fewer than k others,
# exactly k, more than k (48 identities, 200 images).
FACE_COUNTS = [1, 2, 3, 4, 6, 9] * 8


def jpeg(seed: int, size: tuple[int, int] = (112, 112)) -> bytes:
    """A real baseline RGB JPEG (noise + gradient, so sizes differ per seed)."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    image[: height // 2] //= 2
    return simplejpeg.encode_jpeg(image, quality=85)


def pil_bytes(seed: int, mode: str, fmt: str, size: tuple[int, int] = (112, 112)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    out = io.BytesIO()
    image.convert(mode).save(out, format=fmt)
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def messy_tree(root: Path) -> dict[str, str]:
    """Identity folders with every kind of bad input; returns {path: expected outcome}
    where outcome is 'stored' (byte-exact), 'converted' or 'rejected'."""
    expect: dict[str, str] = {}

    def add(rel: str, data: bytes, outcome: str) -> None:
        expect[str(write(root / rel, data))] = outcome

    for person in range(4):
        for k in range(3):
            add(f"person_{person}/{k:03d}.jpg", jpeg(100 * person + k), "stored")
    add("person_0/png.png", pil_bytes(1, "RGB", "PNG"), "converted")
    add("person_0/grey.jpg", pil_bytes(2, "L", "JPEG"), "converted")
    add("person_1/cmyk.jpg", pil_bytes(3, "CMYK", "JPEG"), "converted")
    add("person_1/big.jpg", jpeg(4, (150, 130)), "converted")
    good = jpeg(5)
    add("person_2/truncated.jpg", good[: len(good) // 2], "rejected")
    add("person_2/corrupt.jpg", good[:2] + b"\x00" * 40 + good[42:], "rejected")
    add("person_2/zero.jpg", b"", "rejected")
    add("person_3/notes.txt", b"not an image at all\n", "rejected")
    add("single/only.jpg", jpeg(6), "stored")
    add("all_bad/broken.jpg", b"\xff\xd8garbage", "rejected")
    (root / "empty_person").mkdir()
    broken = root / "person_3" / "dangling.jpg"
    broken.symlink_to(root / "does-not-exist.jpg")
    expect[str(broken)] = "rejected"
    add("stray.jpg", jpeg(7), "rejected")  # not inside an identity folder
    return expect


def face_tree(root: Path, counts: list[int], cut: tuple[int, int] | None = None) -> None:
    """root/<identity>/<image>.jpg of rendered faces; ``cut`` = (identity, image) made short."""
    for identity, count in enumerate(counts):
        folder = root / f"person_{identity:03d}"
        folder.mkdir(parents=True)
        for index in range(count):
            data = encode_jpeg(render_face(identity, index).image)
            if (identity, index) == cut:
                data = data[:len(data) * 2 // 3]
            (folder / f"{index:04d}.jpg").write_bytes(data)


def shard_folder(tree: Path, out: Path, *extra: str) -> Path:
    """``python -m data_engine.shard --src folder`` of ``tree`` into ``out``."""
    assert_ok(run_module("data_engine.shard", "--src", "folder", "--root", tree, "--out", out,
                         "--workers", "1", *extra, timeout=120))
    return out


def shard_synthetic(out: Path, *extra: str, identities: int, seed: int) -> Path:
    """``python -m data_engine.shard --src synthetic`` (3 photos per identity, 16 KiB
    shards) into ``out``."""
    assert_ok(run_module("data_engine.shard", "--src", "synthetic", "--identities", identities,
                         "--images-per-identity", "3", "--seed", seed, "--out", out,
                         "--workers", "1", "--shard-size", "16k", *extra, timeout=120))
    return out


def write_recordio(root: Path, records: list[tuple[int, float | list[float], bytes]]) -> None:
    """train.rec/train.idx from (key, label or label list, payload), written from the format
    description (magic, length word, IfQQ header, float labels, 4-byte padding)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train.rec", "wb") as rec, open(root / "train.idx", "w") as idx:
        for key, label, payload in records:
            if isinstance(label, list):
                body = (struct.pack("<IfQQ", len(label), 0.0, key, 0)
                        + struct.pack(f"<{len(label)}f", *label) + payload)
            else:
                body = struct.pack("<IfQQ", 0, float(label), key, 0) + payload
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(struct.pack("<II", REC_MAGIC, len(body)) + body + b"\0" * (-len(body) % 4))


def insightface_records(groups: list[list[bytes]]) -> list[tuple[int, float | list[float], bytes]]:
    """insightface layout: header record 0, image records 1.., then one record per identity."""
    images, ranges, key = [], [], 1
    for label, group in enumerate(groups):
        ranges.append([float(key), float(key + len(group))])
        for payload in group:
            images.append((key, float(label), payload))
            key += 1
    first = key
    identity_records = [(first + i, r, b"") for i, r in enumerate(ranges)]
    header = (0, [float(first), float(first + len(groups))], b"")
    return [header, *images, *identity_records]


def read_back(out: Path) -> dict:
    """Read every shard with webdataset, tarfile and tar -tf; check they agree and the
    shards layout of ARCHITECTURE.md; return {label: sample dict} from webdataset."""
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [str(out / shard["name"]) for shard in manifest["shards"]]
    samples = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        label = int(sample["cls"])
        assert sample["__key__"] == f"{label:08d}"
        info = json.loads(sample["json"])
        assert info["label"] == label
        jpgs = sorted(k for k in sample if k.endswith(".jpg"))
        assert jpgs == [f"{j:04d}.jpg" for j in range(len(info["images"]))]
        samples[label] = sample
    assert sorted(samples) == list(range(manifest["num_identities"]))
    members = []
    for shard, entry in zip(shards, manifest["shards"]):
        with tarfile.open(shard) as archive:
            names = archive.getnames()
        listed = subprocess.run(["tar", "-tf", shard], capture_output=True, text=True,
                                check=True).stdout.split()
        assert names == listed
        keys = {name.split(".")[0] for name in names}
        assert len(keys) == entry["num_identities"]
        assert sum(name.endswith(".jpg") for name in names) == entry["num_images"]
        assert Path(shard).stat().st_size == entry["bytes"]
        members += names
    assert len(members) == len(set(members))  # an identity never spans two shards
    return samples


def rejected_rows(out: Path) -> dict[str, str]:
    lines = (out / "rejected.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    return dict(line.split("\t", 1) for line in lines[1:])


def output_bytes(out: Path) -> dict[str, bytes]:
    """Everything a user reads from a shards dir (not the resume sidecars)."""
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.is_file()}


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """Assert the CLI convention for bad input (exit 2, one stderr line, no traceback)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]
