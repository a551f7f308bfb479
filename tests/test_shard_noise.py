"""Planted label noise in synthetic shards (--mislabeled-share) and the exclusion list
(--exclude): the truth recorded per image, share 0 unchanged, excluded files accounted for."""

from __future__ import annotations

import json

from synthetic.faces import encode_jpeg, identity_name, photo_subject, render_face
from tests.shard_helpers import one_line_error, output_bytes, read_back

MODULE = "data_engine.shard"


def _shard(run_cli, out, *extra, identities="8", images="5", seed="5"):
    result = run_cli(MODULE, "--src", "synthetic", "--identities", identities,
                     "--images-per-identity", images, "--seed", seed, "--out", out,
                     "--workers", "1", "--shard-size", "16k", *extra)
    assert result.returncode == 0, result.stderr
    return out


def test_share_zero_is_the_plain_dataset_byte_for_byte(tmp_path, run_cli):
    plain = _shard(run_cli, tmp_path / "plain")
    zero = _shard(run_cli, tmp_path / "zero", "--mislabeled-share", "0")
    assert output_bytes(plain) == output_bytes(zero)
    assert {p.name: p.read_bytes() for p in (plain / "parts").iterdir()} == \
        {p.name: p.read_bytes() for p in (zero / "parts").iterdir()}
    samples = read_back(zero)
    # The json member as it was before planted noise existed: no image_info key.
    assert samples[4]["json"] == (b'{"identity":"synth_0000004","images":["0000.jpg",'
                                  b'"0001.jpg","0002.jpg","0003.jpg","0004.jpg"],"label":4}')
    for label, sample in samples.items():
        for j in range(5):
            assert sample[f"{j:04d}.jpg"] == encode_jpeg(render_face(label, j, seed=5).image)
    manifest = json.loads((zero / "manifest.json").read_text())
    assert "mislabeled_share" not in manifest["source_info"]


def test_mislabeled_share_records_the_truth_per_image(tmp_path, run_cli):
    out = _shard(run_cli, tmp_path / "noisy", "--mislabeled-share", "0.3", identities="12")
    samples = read_back(out)
    planted = 0
    for label, sample in samples.items():
        info = json.loads(sample["json"])
        assert len(info["image_info"]) == len(info["images"]) == 5
        for j, truth in enumerate(info["image_info"]):
            shows, photo = photo_subject(label, j, seed=5, mislabeled_share=0.3, identities=12)
            assert truth["path"] == f"synthetic:{identity_name(label)}/{j:04d}.jpg"
            assert truth["shows"] == identity_name(shows)
            assert truth["mislabeled"] == (shows != label)
            face = render_face(shows, photo, seed=5)
            assert truth["quality"] == face.quality
            assert sample[f"{j:04d}.jpg"] == encode_jpeg(face.image)
            if truth["mislabeled"]:
                # another person's photo, not a copy of one of their own photos
                assert photo >= 5 and sample[f"{j:04d}.jpg"] != encode_jpeg(
                    render_face(shows, j, seed=5).image)
            planted += truth["mislabeled"]
    assert 8 <= planted <= 30  # 60 photos at 30 %
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_info"]["mislabeled_share"] == 0.3


def test_bad_share_is_one_line(tmp_path, run_cli):
    result = run_cli(MODULE, "--src", "synthetic", "--out", tmp_path / "o",
                     "--mislabeled-share", "1.5")
    assert "--mislabeled-share" in one_line_error(result)


def test_exclusion_list_moves_files_to_rejected(tmp_path, run_cli):
    listing = tmp_path / "exclude.tsv"
    listing.write_text("path\tidentity\tscore\n"
                       "# comment lines are skipped\n"
                       "synthetic:synth_0000002/0001.jpg\tsynth_0000002\t0.9\n"
                       "synth_0000005/0004.jpg\n"  # the <identity>/<image> key works too
                       + "".join(f"synthetic:synth_0000007/{j:04d}.jpg\n" for j in range(5)))
    plain = _shard(run_cli, tmp_path / "plain")
    out = _shard(run_cli, tmp_path / "cut", "--exclude", listing)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 40 - 7
    assert manifest["dropped_identities"] == [{"name": "synth_0000007",
                                              "reason": "all images rejected"}]
    rejected = (out / "rejected.tsv").read_text().splitlines()
    assert sorted(line for line in rejected if line.endswith("\texcluded")) == sorted(
        ["synthetic:synth_0000002/0001.jpg\texcluded", "synthetic:synth_0000005/0004.jpg\t"
         "excluded", *(f"synthetic:synth_0000007/{j:04d}.jpg\texcluded" for j in range(5))])
    samples = read_back(out)
    assert json.loads(samples[2]["json"])["images"] == ["0000.jpg", "0002.jpg", "0003.jpg",
                                                        "0004.jpg"]
    assert json.loads(samples[5]["json"])["images"] == [f"{j:04d}.jpg" for j in range(4)]
    assert len(samples) == 7  # identity 7 is gone, labels stay contiguous
    assert json.loads(samples[6]["json"])["identity"] == "synth_0000006"
    # Rerunning without --exclude into the same folder is another dataset: refused, not mixed.
    again = run_cli(MODULE, "--src", "synthetic", "--identities", "8",
                    "--images-per-identity", "5", "--seed", "5", "--out", out,
                    "--workers", "1", "--shard-size", "16k")
    assert again.returncode == 2
    assert output_bytes(plain) != output_bytes(out)


def test_missing_exclusion_list_is_one_line(tmp_path, run_cli):
    result = run_cli(MODULE, "--src", "synthetic", "--out", tmp_path / "o",
                     "--exclude", tmp_path / "none.tsv")
    assert "--exclude" in one_line_error(result)
