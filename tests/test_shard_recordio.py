"""`--src rec|ms1mv3`: RecordIO files written by the test's own writer, read without mxnet."""

from __future__ import annotations

import json
import os

from data_engine.loading.reader import ShardReader
from tests.shard_helpers import (
    insightface_records,
    jpeg,
    one_line_error,
    pil_bytes,
    read_back,
    rejected_rows,
    write_recordio,
)

MODULE = "data_engine.shard"


def _groups() -> list[list[bytes]]:
    return [[jpeg(10 * g + i) for i in range(n)] for g, n in enumerate([3, 1, 4, 2])]


def _check(out, groups: list[list[bytes]]) -> None:
    samples = read_back(out)
    assert len(samples) == len(groups)
    reader = ShardReader(out)
    for label, _, images in reader.iter_identities():
        assert images == groups[label]  # byte-exact, record order kept
        assert [samples[label][f"{j:04d}.jpg"] for j in range(len(images))] == images


def test_with_header_record(tmp_path, run_cli):
    groups = _groups()
    write_recordio(tmp_path / "rec", insightface_records(groups))
    out = tmp_path / "out"
    result = run_cli(MODULE, "--src", "ms1mv3", "--root", tmp_path / "rec", "--out", out,
                     "--shard-size", "8k", "--workers", "2")
    assert result.returncode == 0, result.stderr
    _check(out, groups)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "ms1mv3" and manifest["num_images"] == 10
    assert (out / "identities.txt").read_text().split() == [f"{i:08d}" for i in range(4)]
    assert manifest["num_rejected"] == 0 and len(manifest["shards"]) > 1


def test_without_header_shuffled_labels(tmp_path, run_cli):
    groups = _groups()
    bad = pil_bytes(1, "RGB", "PNG", size=(120, 120))
    records = []
    key = 0
    for i in range(4):  # interleave identities like a shuffled im2rec file
        for label, group in enumerate(groups):
            if i < len(group):
                records.append((key, float(label * 7), group[i]))
                key += 1
    records.append((key, [21.0, 5.0, 6.0], jpeg(99)))  # multi-label record: first is class
    records.append((key + 1, 14.0, b"garbage"))
    records.append((key + 2, 14.0, bad))
    write_recordio(tmp_path / "rec", records)
    out = tmp_path / "out"
    result = run_cli(MODULE, "--src", "rec", "--root", tmp_path / "rec", "--out", out,
                     "--workers", "1")
    assert result.returncode == 0, result.stderr
    names = (out / "identities.txt").read_text().split()
    assert names == ["00000000", "00000007", "00000014", "00000021"]
    reader = ShardReader(out)
    assert [len(reader.identity_images(i)) for i in range(4)] == [3, 1, 5, 3]
    _, _, images = next(iter(reader.iter_identities()))
    assert images == groups[0]
    rejected = rejected_rows(out)
    assert rejected == {f"{tmp_path / 'rec' / 'train.rec'}#{key + 1}": "not an image"}
    read_back(out)




def test_bad_magic(tmp_path, run_cli):
    write_recordio(tmp_path / "rec", insightface_records(_groups()))
    rec = tmp_path / "rec" / "train.rec"
    data = bytearray(rec.read_bytes())
    data[0:4] = b"\x00\x01\x02\x03"
    rec.write_bytes(bytes(data))
    line = one_line_error(run_cli(MODULE, "--src", "rec", "--root", tmp_path / "rec",
                          "--out", tmp_path / "out"))
    assert str(rec) in line and "bad RecordIO magic at offset 0" in line


def test_truncated_last_record(tmp_path, run_cli):
    groups = [[jpeg(i) for i in range(3)]]
    write_recordio(tmp_path / "rec", [(k, 0.0, data) for k, data in enumerate(groups[0])])
    rec = tmp_path / "rec" / "train.rec"
    last_offset = int((tmp_path / "rec" / "train.idx").read_text().split()[-1])
    os.truncate(rec, rec.stat().st_size - 100)
    line = one_line_error(run_cli(MODULE, "--src", "rec", "--root", tmp_path / "rec",
                          "--out", tmp_path / "out"))
    assert str(rec) in line and f"truncated record at offset {last_offset}" in line


def test_missing_rec_files(tmp_path, run_cli):
    (tmp_path / "rec").mkdir()
    line = one_line_error(run_cli(MODULE, "--src", "rec", "--root", tmp_path / "rec",
                          "--out", tmp_path / "out"))
    assert "train.rec is missing" in line
