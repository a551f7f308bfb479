"""IJB layout parsing: good files read, every bad input named with file (and line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from evaluate import ijb_meta


def _write_layout(root: Path) -> None:
    meta = root / "meta"
    meta.mkdir(parents=True)
    (meta / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 10\n2.jpg 1 11\n3.jpg 2 12\n")
    (meta / "ijbc_name_5pts_score.txt").write_text(
        "".join(f"{i}.jpg " + " ".join(["50.5"] * 10) + f" 0.{i}\n" for i in (1, 2, 3)))
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 0\n2 1 1\n")
    for name, rows in (("gallery_G1", "1,5,a.jpg\n"), ("gallery_G2", "2,6,b.jpg\n"),
                       ("probe_mixed", "2,5,c.jpg\n2,5,d.jpg\n")):
        (meta / f"ijbc_1N_{name}.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + rows)


def test_reads_the_layout(tmp_path):
    _write_layout(tmp_path)
    images = ijb_meta.read_image_meta(tmp_path, "ijbc")
    assert images.names == ["1.jpg", "2.jpg", "3.jpg"]
    assert images.templates.tolist() == [1, 1, 2] and images.medias.tolist() == [10, 11, 12]
    marks = ijb_meta.read_landmarks(tmp_path, "ijbc", images.names)
    assert marks.points.shape == (3, 5, 2) and marks.scores.tolist() == [0.1, 0.2, 0.3]
    pairs, labels = ijb_meta.read_pairs(tmp_path, "ijbc")
    assert pairs.tolist() == [[1, 2], [2, 1]] and labels.tolist() == [0, 1]
    g1, _, probe = ijb_meta.read_one_to_n(tmp_path, "ijbc")
    assert g1.templates.tolist() == [1] and probe.subjects.tolist() == [5, 5]


@pytest.mark.parametrize("name", ["face_tid_mid.txt", "template_pair_label.txt",
                                  "1N_gallery_G2.csv"])
def test_missing_meta_file_is_named(tmp_path, name):
    _write_layout(tmp_path)
    (tmp_path / "meta" / f"ijbc_{name}").unlink()
    with pytest.raises(UserError, match=f"ijbc_{name}: missing"):
        ijb_meta.read_image_meta(tmp_path, "ijbc")
        ijb_meta.read_pairs(tmp_path, "ijbc")
        ijb_meta.read_one_to_n(tmp_path, "ijbc")


@pytest.mark.parametrize(("name", "content", "line"), [
    ("face_tid_mid.txt", "1.jpg 1 10\n2.jpg one 11\n", 2),
    ("face_tid_mid.txt", "1.jpg 1 10\n\n2.jpg 1\n", 3),
    ("template_pair_label.txt", "1 2 0\n2 1 1\n1 2\n1 2 1 7\n", 3),
    ("template_pair_label.txt", "1 2 0\n2 1 1\n1 x 1\n", 3),
    ("template_pair_label.txt", "1 2 0\n2 1 2\n", 2),
    ("template_pair_label.txt", "1 2 0\n2 1 0.5\n", 2),
    ("1N_probe_mixed.csv", "TEMPLATE_ID,SUBJECT_ID\n2,5\nnine,5\n", 3),
])
def test_malformed_line_names_file_and_line(tmp_path, name, content, line):
    _write_layout(tmp_path)
    (tmp_path / "meta" / f"ijbc_{name}").write_text(content)
    with pytest.raises(UserError, match=rf"ijbc_{name}:{line}: expected"):
        ijb_meta.read_image_meta(tmp_path, "ijbc")
        ijb_meta.read_pairs(tmp_path, "ijbc")
        ijb_meta.read_one_to_n(tmp_path, "ijbc")


def test_landmark_file_errors(tmp_path):
    _write_layout(tmp_path)
    names = ijb_meta.read_image_meta(tmp_path, "ijbc").names
    path = tmp_path / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].rsplit(" ", 3)[0], lines[2]]) + "\n")
    with pytest.raises(UserError, match=r"ijbc_name_5pts_score\.txt:2: expected"):
        ijb_meta.read_landmarks(tmp_path, "ijbc", names)
    path.write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    with pytest.raises(UserError, match=r"5pts_score\.txt:2: image .3\.jpg.*orders must match"):
        ijb_meta.read_landmarks(tmp_path, "ijbc", names)
    path.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(UserError, match="2 lines but 3 images"):
        ijb_meta.read_landmarks(tmp_path, "ijbc", names)


def test_pairs_with_blank_lines_parse(tmp_path):
    _write_layout(tmp_path)
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 0\n\n2 1 1")
    pairs, labels = ijb_meta.read_pairs(tmp_path, "ijbc")
    assert pairs.tolist() == [[1, 2], [2, 1]] and labels.dtype == np.int8


def test_fast_and_line_by_line_parsers_agree(tmp_path):
    """Files the vectorised path declines (CRLF, spaces, tabs, extra CSV columns, blank
    lines) still parse, to what the plain files give."""
    _write_layout(tmp_path)
    plain = (ijb_meta.read_image_meta(tmp_path, "ijbc"), ijb_meta.read_one_to_n(tmp_path, "ijbc"))
    meta = tmp_path / "meta"
    (meta / "ijbc_face_tid_mid.txt").write_bytes(b"1.jpg\t1 10\r\n\n 2.jpg  1 11\r\n3.jpg 2 12")
    (meta / "ijbc_1N_probe_mixed.csv").write_bytes(
        b"TEMPLATE_ID,SUBJECT_ID,FILENAME\r\n2, 5,c.jpg,x,y\r\n\r\n 2,5\r\n")
    images = ijb_meta.read_image_meta(tmp_path, "ijbc")
    assert images.names == plain[0].names
    assert images.templates.tolist() == plain[0].templates.tolist()
    assert images.medias.tolist() == plain[0].medias.tolist()
    probe = ijb_meta.read_one_to_n(tmp_path, "ijbc")[2]
    assert probe.templates.tolist() == plain[1][2].templates.tolist() == [2, 2]
    assert probe.subjects.tolist() == plain[1][2].subjects.tolist() == [5, 5]


def test_token_count_is_exact_beyond_the_fast_counters_range(tmp_path):
    """259 tokens on a line would read as 3 modulo 256: the long line is still caught."""
    _write_layout(tmp_path)
    long_line = " ".join(["1"] * 259)
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").write_text(f"1 2 0\n{long_line}\n")
    with pytest.raises(UserError, match=r"ijbc_template_pair_label\.txt:2: expected"):
        ijb_meta.read_pairs(tmp_path, "ijbc")
    assert ijb_meta._first_bad_line(b"1 2 3\n" * 3 + long_line.encode(), 3) == 4
    assert ijb_meta._first_bad_line(b"1 2 3\n\n 4 5\t6\r\n", 3) is None
