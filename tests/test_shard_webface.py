"""`--src webface4m..42m`: a WebFace42M-style root with parts 0..9."""

from __future__ import annotations

import json

from tests.shard_helpers import jpeg, read_back, write

MODULE = "data_engine.shard"


def _webface_root(root, parts: int) -> dict[str, bytes]:
    files = {}
    for part in range(parts):
        for person in range(2):
            for k in range(2):
                rel = f"{part}/{part}_0_{person:07d}/{k}.jpg"
                files[rel] = write(root / rel, jpeg(100 * part + 10 * person + k)).read_bytes()
    return files


def test_webface8m_takes_parts_0_and_1(tmp_path, run_cli):
    files = _webface_root(tmp_path / "wf", 3)
    out = tmp_path / "out"
    result = run_cli(MODULE, "--src", "webface8m", "--root", tmp_path / "wf", "--out", out,
                     "--workers", "2")
    assert result.returncode == 0, result.stderr
    samples = read_back(out)
    names = (out / "identities.txt").read_text().split()
    assert names == ["0/0_0_0000000", "0/0_0_0000001", "1/1_0_0000000", "1/1_0_0000001"]
    for label, name in enumerate(names):
        info = json.loads(samples[label]["json"])
        assert info["identity"] == name
        for j, image in enumerate(info["images"]):
            assert samples[label][f"{j:04d}.jpg"] == files[f"{name}/{image}"]
    assert json.loads((out / "manifest.json").read_text())["source"] == "webface8m"


def test_missing_part_is_named(tmp_path, run_cli):
    _webface_root(tmp_path / "wf", 2)
    result = run_cli(MODULE, "--src", "webface12m", "--root", tmp_path / "wf",
                     "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "WebFace part 2 is missing" in lines[0], result.stderr
