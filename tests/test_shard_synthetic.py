"""`--src synthetic`: identities rendered in the workers, same bytes for any worker count."""

from __future__ import annotations

import json

from synthetic.faces import encode_jpeg, identity_name, render_face
from tests.shard_helpers import output_bytes, read_back

MODULE = "data_engine.shard"


def test_synthetic_shards_are_deterministic(tmp_path, run_cli):
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        result = run_cli(MODULE, "--src", "synthetic", "--identities", "6",
                         "--images-per-identity", "3", "--seed", "5", "--out", out,
                         "--shard-size", "16k", "--workers", workers)
        assert result.returncode == 0, result.stderr
        outs.append(out)
    assert output_bytes(outs[0]) == output_bytes(outs[1])
    samples = read_back(outs[0])
    assert len(samples) == 6
    info = json.loads(samples[4]["json"])
    assert info["identity"] == identity_name(4)
    assert samples[4]["0002.jpg"] == encode_jpeg(render_face(4, 2, seed=5).image)
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    assert manifest["num_images"] == 18 and manifest["source"] == "synthetic"
    assert manifest["source_info"]["seed"] == 5 and len(manifest["shards"]) > 1


def test_root_is_refused_for_synthetic(tmp_path, run_cli):
    result = run_cli(MODULE, "--src", "synthetic", "--root", tmp_path, "--out", tmp_path / "o")
    assert result.returncode == 2 and "--root is not used" in result.stderr
