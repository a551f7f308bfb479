"""``--merge`` (identity names sharded under one label) and whole identities in
``--exclude``: round trips through real shards, the manifest and rejected.tsv."""

from __future__ import annotations

import json
from functools import partial

from synthetic.faces import encode_jpeg, identity_name, render_face
from tests.helpers import assert_one_line_error
from tests.shard_helpers import one_line_error, output_bytes, read_back, shard_synthetic

MODULE = "data_engine.shard"
_shard = partial(shard_synthetic, identities=8, seed=2)


def test_merged_and_excluded_identities_round_trip(tmp_path):
    merge = tmp_path / "duplicates.tsv"
    merge.write_text("name_a\tname_b\tcosine\n# a comment\n"
                     "synth_0000005\tsynth_0000001\t0.98\n"
                     "synth_0000006\tsynth_0000005\t0.97\n")  # a chain: one group of three
    exclude = tmp_path / "overlap.tsv"
    exclude.write_text("identity\tcosine\nsynth_0000003\t0.9\n")
    plain = _shard(tmp_path / "plain")
    out = _shard(tmp_path / "merged", "--merge", merge, "--exclude", exclude)
    samples = read_back(out)
    names = [json.loads(sample["json"])["identity"] for sample in samples.values()]
    assert names == [identity_name(i) for i in (0, 1, 2, 4, 7)]  # labels 0..4 in name order
    merged = json.loads(samples[1]["json"])
    assert merged["images"] == ["0000.jpg", "0001.jpg", "0002.jpg",
                                *(f"synth_000000{i}/000{j}.jpg" for i in (5, 6) for j in range(3))]
    for j, (person, photo) in enumerate([(p, k) for p in (1, 5, 6) for k in range(3)]):
        assert samples[1][f"{j:04d}.jpg"] == encode_jpeg(render_face(person, photo,
                                                                     seed=2).image)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["merged_identities"] == [{"name": "synth_0000005", "into": "synth_0000001"},
                                             {"name": "synth_0000006", "into": "synth_0000001"}]
    assert manifest["num_identities"] == 5 and manifest["num_images"] == 8 * 3 - 3
    assert manifest["options"]["merge_sha256"] and manifest["options"]["exclude_sha256"]
    plain_manifest = json.loads((plain / "manifest.json").read_text())
    assert "merged_identities" not in plain_manifest
    assert "merge_sha256" not in plain_manifest["options"]
    assert manifest["fingerprint"] != plain_manifest["fingerprint"]
    rejected = (out / "rejected.tsv").read_text().splitlines()
    assert rejected[1:] == [f"synthetic:synth_0000003/000{j}.jpg\texcluded identity"
                            for j in range(3)]
    before = output_bytes(out)
    _shard(out, "--merge", merge, "--exclude", exclude)  # the same job: kept as is
    assert output_bytes(out) == before


def test_the_same_pairs_in_another_order_are_the_same_dataset(tmp_path):
    first, second = tmp_path / "a.tsv", tmp_path / "b.tsv"
    first.write_text("synth_0000002\tsynth_0000004\nsynth_0000000\tsynth_0000007\n")
    second.write_text("synth_0000007\tsynth_0000000\nsynth_0000004\tsynth_0000002\n")
    a = _shard(tmp_path / "a", "--merge", first)
    b = _shard(tmp_path / "b", "--merge", second)
    assert output_bytes(a) == output_bytes(b)


def test_merge_naming_an_unknown_identity_is_one_line(tmp_path, run_cli):
    merge = tmp_path / "m.tsv"
    merge.write_text("synth_0000001\tsynth_0000002\nsynth_0000001\tnobody\n")
    result = run_cli(MODULE, "--src", "synthetic", "--identities", "4",
                     "--images-per-identity", "2", "--out", tmp_path / "o", "--merge", merge)
    assert_one_line_error(result, f"{merge}:2", "'nobody'")  # found after the scan
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_merge_line_without_two_names_is_one_line(tmp_path, run_cli):
    merge = tmp_path / "m.tsv"
    merge.write_text("synth_0000001\n")
    result = run_cli(MODULE, "--src", "synthetic", "--identities", "4", "--out",
                     tmp_path / "o", "--merge", merge)
    assert f"{merge}:1" in one_line_error(result)
