"""bench/clean_retrain.py's tiny loop end to end (train, noise + duplicates reports,
reshard with exclusions and merges, retrain, before/after table, rerun skips) and
bench/knn_scale.py at toy sizes (exact vs HNSW numbers, the 2M extrapolation labelled)."""

from __future__ import annotations

import json

import pytest

from common.run_folder import read_config
from tests.helpers import run_module


def _bench(name, *args):
    """One thread per process, as every CLI under test (the bench's children inherit it)."""
    return run_module(f"bench.{name}", *args, timeout=1200)


def test_tiny_clean_and_retrain_loop(tmp_path):
    out = tmp_path / "clean"
    done = _bench("clean_retrain", "--out", out, "--size", "tiny", "--lr-rule", "paper")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["seeds"] == [0] and "--exclude-share 0.1" in summary["command"]
    for when in ("before", "after"):  # the paper's lr per sample at the tiny B = 8
        config = read_config(out / "runs" / f"{when}-s0")
        assert config["lr"] == pytest.approx(0.1 * 8 / 384, rel=1e-5)
        assert config["warmup_epochs"] == 0.2
    result = json.loads((out / "clean_retrain.json").read_text())
    row = result["rows"][0]
    for when in ("before", "after"):
        assert 0.0 <= row[when]["accuracy"] <= 1.0 and 0.0 <= row[when]["tar@0.0001"] <= 1.0
    cleaned = json.loads((out / "clean-s0" / "shards" / "manifest.json").read_text())
    assert cleaned["options"]["exclude_sha256"]  # the noise report's top rows are cut
    assert cleaned["num_images"] == 16 * 4 - row["cleaning"]["excluded_photos"] == 58
    assert row["after"]["steps"] < row["before"]["steps"]  # same epochs, fewer photos
    text = (out / "clean_retrain.md").read_text()
    assert "| before cleaning |" in text and "| after cleaning |" in text
    marks = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    again = _bench("clean_retrain", "--out", out, "--size", "tiny", "--lr-rule", "paper")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout and "sharding" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in marks} == marks


def test_knn_scale_at_toy_sizes():
    done = _bench("knn_scale", "--sizes", "800", "1600", "--dim", "32", "--sample", "200",
                  "--extrapolate-to", "3200")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["centres"] for row in result["rows"]] == [800, 1600]
    for row in result["rows"]:
        assert row["hnsw_recall_at_10"] >= 0.9 and row["flat_duplicates_found"] >= 0.9
        assert row["flat_index_bytes"] >= row["centres"] * 32 * 4
    extrapolated = result["extrapolated"]
    assert extrapolated["extrapolated_from"] == 1600 and extrapolated["centres"] == 3200
    assert extrapolated["flat_query_all_s"] == \
        result["rows"][1]["flat_query_all_s_extrapolated"] * 4  # N² from 1600 to 3200
