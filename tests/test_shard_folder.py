"""`--src folder` end to end on a real messy tree, read back by three tar readers."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from data_engine.loading.reader import ShardReader
from tests.helpers import run_module
from tests.shard_helpers import (
    jpeg,
    messy_tree,
    one_line_error,
    output_bytes,
    read_back,
    rejected_rows,
    write,
)

MODULE = "data_engine.shard"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    return root, messy_tree(root)


@pytest.fixture(scope="module")
def sharded(tree, tmp_path_factory):
    root, _ = tree
    out = tmp_path_factory.mktemp("out") / "shards"
    result = run_module(MODULE, "--src", "folder", "--root", root, "--out", out,
                        "--shard-size", "20k", "--workers", "2", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "relabelling" in result.stderr  # all_bad emptied after planning: labels shift
    return out


def test_every_file_is_stored_once_or_rejected(tree, sharded):
    root, expect = tree
    samples = read_back(sharded)
    rejected = rejected_rows(sharded)
    stored: dict[str, bytes] = {}
    for sample in samples.values():
        info = json.loads(sample["json"])
        for j, image in enumerate(info["images"]):
            path = str(root / info["identity"] / image)
            assert path not in stored
            stored[path] = sample[f"{j:04d}.jpg"]
    assert set(stored).isdisjoint(rejected)
    assert set(stored) | set(rejected) == set(expect)
    for path, outcome in expect.items():
        if outcome == "stored":
            assert stored[path] == Path(path).read_bytes()  # byte-exact pass-through
        elif outcome == "converted":
            assert stored[path][:2] == b"\xff\xd8" and stored[path] != Path(path).read_bytes()
        else:
            assert path in rejected, path


def test_reasons_labels_and_manifest(sharded):
    rejected = rejected_rows(sharded)
    reason = {os.path.basename(path): why for path, why in rejected.items()}
    assert reason["zero.jpg"] == "empty file"
    assert reason["notes.txt"] == "not an image"
    assert "truncated" in reason["truncated.jpg"]
    assert "corrupt" in reason["corrupt.jpg"]
    assert "unreadable" in reason["dangling.jpg"]
    assert "identity folder" in reason["stray.jpg"]
    manifest = json.loads((sharded / "manifest.json").read_text())
    names = (sharded / "identities.txt").read_text().splitlines()
    assert names == sorted(names) == ["person_0", "person_1", "person_2", "person_3", "single"]
    dropped = {d["name"]: d["reason"] for d in manifest["dropped_identities"]}
    assert dropped == {"empty_person": "no files", "all_bad": "all images rejected"}
    assert manifest["format_version"] == 1 and manifest["source"] == "folder"
    assert manifest["image_size"] == [112, 112]
    assert manifest["num_identities"] == 5 and manifest["num_images"] == 17
    assert manifest["num_converted"] == 4 and manifest["num_rejected"] == len(rejected) == 7
    assert len(manifest["shards"]) > 1
    assert not list(sharded.glob(".*")) and not list((sharded / "parts").glob(".*"))


def test_reader_matches_tar_members(sharded):
    reader = ShardReader(sharded)
    assert reader.num_identities == 5 and reader.num_images == 17
    seen = 0
    for label, name, images in reader.iter_identities():
        assert reader.identity_name(label) == name
        shard = reader.shard_paths[int(reader.image_shard[reader.identity_start[label]])]
        with tarfile.open(shard) as archive:
            for j, data in enumerate(images):
                member = archive.extractfile(f"{label:08d}.{j:04d}.jpg")
                assert member.read() == data
        assert list(reader.image_labels[reader.identity_images(label)]) == [label] * len(images)
        seen += len(images)
    assert seen == reader.num_images
    assert reader.read_image(reader.num_images - 1)[-2:] == b"\xff\xd9"


def test_same_output_with_other_worker_count(tree, sharded, tmp_path, run_cli):
    root, _ = tree
    out = tmp_path / "again"
    result = run_cli(MODULE, "--src", "folder", "--root", root, "--out", out,
                     "--shard-size", "20k", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert output_bytes(out) == output_bytes(sharded)


def test_rerun_on_finished_dir_keeps_it(tree, sharded, run_cli):
    root, _ = tree
    before = {p.name: p.stat().st_mtime_ns for p in sharded.glob("shard-*.tar")}
    result = run_cli(MODULE, "--src", "folder", "--root", root, "--out", sharded,
                     "--shard-size", "20k", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "0 to write" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in sharded.glob("shard-*.tar")} == before


def test_on_mismatch_reject(tree, tmp_path, run_cli):
    root, expect = tree
    out = tmp_path / "strict"
    result = run_cli(MODULE, "--src", "folder", "--root", root, "--out", out,
                     "--on-mismatch", "reject", "--verify", "full", "--workers", "1")
    assert result.returncode == 0, result.stderr
    rejected = rejected_rows(out)
    for path, outcome in expect.items():
        assert (path in rejected) == (outcome != "stored"), path
    assert "expected a 112x112 colour jpeg" in rejected[str(root / "person_1" / "big.jpg")]
    read_back(out)


def test_refuses_other_dataset_unless_overwrite(tree, sharded, tmp_path, run_cli):
    other = tmp_path / "other"
    write(other / "x" / "a.jpg", jpeg(1))
    result = run_cli(MODULE, "--src", "folder", "--root", other, "--out", sharded)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "different dataset" in lines[0] and "--overwrite" in lines[0]
    assert "root" in lines[0]
    foreign = tmp_path / "foreign"
    write(foreign / "notes.txt", b"mine")
    result = run_cli(MODULE, "--src", "folder", "--root", other, "--out", foreign)
    assert result.returncode == 2 and "not written by data_engine.shard" in result.stderr
    copy = tmp_path / "copy"
    result = run_cli(MODULE, "--src", "folder", "--root", tree[0], "--out", copy,
                     "--workers", "1")
    assert result.returncode == 0
    result = run_cli(MODULE, "--src", "folder", "--root", other, "--out", copy, "--overwrite",
                     "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads((copy / "manifest.json").read_text())["num_images"] == 1
    assert len(list(copy.glob("shard-*.tar"))) == 1
    shutil.rmtree(copy / "parts")  # the manifest alone still says which dataset this is
    result = run_cli(MODULE, "--src", "folder", "--root", tree[0], "--out", copy)
    assert result.returncode == 2 and f"root: {other} -> {tree[0]}" in result.stderr




def test_bad_roots_are_one_line_errors(tmp_path, run_cli):
    missing = tmp_path / "missing"
    line = one_line_error(run_cli(MODULE, "--src", "folder", "--root", missing,
                                   "--out", tmp_path / "o"))
    assert str(missing) in line
    empty = tmp_path / "no_images"
    (empty / "person").mkdir(parents=True)
    line = one_line_error(run_cli(MODULE, "--src", "folder", "--root", empty,
                                   "--out", tmp_path / "o2"))
    assert "no images found" in line and str(empty) in line
    # The failed attempt wrote no shard, so its --out still counts as empty.
    write(tmp_path / "good" / "person" / "a.jpg", jpeg(3))
    result = run_cli(MODULE, "--src", "folder", "--root", tmp_path / "good",
                     "--out", tmp_path / "o2", "--workers", "1")
    assert result.returncode == 0, result.stderr


def test_read_only_out(tree, tmp_path, run_cli):
    """A path under sysfs is read-only even for root; a chmod 555 dir too for other users."""
    root, _ = tree
    line = one_line_error(run_cli(MODULE, "--src", "folder", "--root", root,
                                   "--out", "/sys/attfc-shards-test"))
    assert "/sys/attfc-shards-test" in line and "cannot create" in line
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        line = one_line_error(run_cli(MODULE, "--src", "folder", "--root", root,
                                       "--out", locked))
        assert str(locked) in line and "not writable" in line


def test_second_run_on_same_out_is_refused(tree, tmp_path, run_cli):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # what a running data_engine.shard holds
        line = one_line_error(run_cli(MODULE, "--src", "folder", "--root", tree[0],
                                       "--out", out))
        assert "being written by another" in line
    finally:
        os.close(holder)


def test_reader_rejects_missing_or_inconsistent_dirs(sharded, tmp_path):
    from common.errors import UserError

    with pytest.raises(UserError, match=r"no manifest\.json"):
        ShardReader(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    (broken / "identities.txt").write_text("only_one\n")
    with pytest.raises(UserError, match=r"does not match manifest\.json"):
        ShardReader(broken)
