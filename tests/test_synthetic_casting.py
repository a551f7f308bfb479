"""Planted duplicate identities and benchmark people in the synthetic source: who each
name shows, recorded per image in the shards, and the plain dataset unchanged without them."""

from __future__ import annotations

import json
from functools import partial

import pytest

from synthetic.casting import Casting
from synthetic.faces import encode_jpeg, identity_name, render_face
from tests.shard_helpers import one_line_error, output_bytes, read_back, shard_synthetic

MODULE = "data_engine.shard"
_shard = partial(shard_synthetic, identities=10, seed=4)


def test_plain_casting_shows_every_name_its_own_person_in_its_own_photos():
    casting = Casting(identities=50, seed=3)
    assert [casting.photo(i, j) for i in range(50) for j in range(3)] == \
        [(i, j, False) for i in range(50) for j in range(3)]
    assert casting.describe() == {} and not casting.plants_truth


def test_duplicate_names_show_an_original_in_new_photos_and_never_chain():
    casting = Casting(identities=400, seed=7, duplicate_share=0.1)
    copies = {i: casting.person(i) for i in range(400) if casting.person(i) != i}
    assert 20 <= len(copies) <= 60  # about 10 % of 400 names, fewer once chains are cut
    for copy, original in copies.items():
        assert casting.person(original) == original  # an original, not another copy
        person, photo, mislabeled = casting.photo(copy, 2)
        assert person == original and not mislabeled and photo >= 1 << 41
        assert casting.photo(original, 2) == (original, 2, False)


def test_planted_benchmark_names_follow_the_ordinary_ones():
    casting = Casting(identities=10, seed=0, benchmark_people=3, benchmark_first=500)
    assert casting.names == 13
    assert [casting.person(i) for i in (9, 10, 12)] == [9, 500, 502]
    person, photo, mislabeled = casting.photo(11, 0)
    assert person == 501 and photo >= 1 << 42 and not mislabeled  # not a benchmark photo
    with pytest.raises(ValueError, match="held out"):
        Casting(identities=600, seed=0, benchmark_people=3, benchmark_first=500)


def test_mislabeled_photo_of_the_same_person_under_a_duplicate_name_is_not_mislabeled():
    casting = Casting(identities=60, seed=1, mislabeled_share=0.5, duplicate_share=0.3)
    for i in range(60):
        for j in range(6):
            person, _, mislabeled = casting.photo(i, j)
            assert mislabeled == (person != casting.person(i))



def test_shards_record_who_each_photo_shows(tmp_path):
    out = _shard(tmp_path / "planted", "--duplicate-share", "0.4",
                 "--plant-benchmark", "2", "--benchmark-first-identity", "300")
    casting = Casting(identities=10, seed=4, duplicate_share=0.4, benchmark_people=2,
                      benchmark_first=300)
    samples = read_back(out)
    assert len(samples) == 12
    shown = set()
    for label, sample in samples.items():
        info = json.loads(sample["json"])
        assert info["identity"] == identity_name(label)
        for j, truth in enumerate(info["image_info"]):
            person, photo, _ = casting.photo(label, j)
            assert truth["shows"] == identity_name(person)
            assert sample[f"{j:04d}.jpg"] == encode_jpeg(render_face(person, photo,
                                                                     seed=4).image)
            shown.add(person)
    assert {300, 301} <= shown and len(shown) < 12  # benchmark people in, duplicates merged
    source = json.loads((out / "manifest.json").read_text())["source_info"]
    assert source["duplicate_share"] == 0.4 and source["benchmark_people"] == 2
    assert source["benchmark_first"] == 300


def test_zero_planting_is_the_plain_dataset_byte_for_byte(tmp_path):
    plain = _shard(tmp_path / "plain")
    zero = _shard(tmp_path / "zero", "--duplicate-share", "0", "--plant-benchmark", "0")
    assert output_bytes(plain) == output_bytes(zero)


def test_benchmark_people_inside_the_training_range_is_one_line(tmp_path, run_cli):
    result = run_cli(MODULE, "--src", "synthetic", "--identities", "10", "--out",
                     tmp_path / "o", "--plant-benchmark", "2", "--benchmark-first-identity", "5")
    assert "held out" in one_line_error(result)
