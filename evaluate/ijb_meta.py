"""Read insightface's IJB-B/IJB-C layout, naming the file and line of anything malformed.

Layout (``P`` = ``ijbc`` or ``ijbb``)::

    ROOT/meta/P_face_tid_mid.txt          image_name template_id media_id      (one per image)
    ROOT/meta/P_name_5pts_score.txt       image_name x1 y1 ... x5 y5 score    (same order)
    ROOT/meta/P_template_pair_label.txt   template1 template2 label           (1:1 protocol)
    ROOT/meta/P_1N_gallery_{G1,G2}.csv    header; TEMPLATE_ID,SUBJECT_ID,...  (IJB-B: S1,S2)
    ROOT/meta/P_1N_probe_mixed.csv
    ROOT/loose_crop/image_name

Row ``i`` of a feature matrix is image line ``i`` of ``face_tid_mid``, as in eval_ijbc.py.

The big files (15.7M pair lines, 470k image lines for IJB-C) are parsed vectorised: tokens
counted per line and numbers converted in C. Only a file that fails that fast path is read
again line by line, to name the first bad line (or to accept what the fast path is too
strict for, with the same result).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError

# The IJB benchmarks by file prefix, with their two 1:N galleries.
GALLERIES = {"ijbb": ("S1", "S2"), "ijbc": ("G1", "G2")}
IJB_SETS = tuple(GALLERIES)
_FIRST_TWO_FIELDS = re.compile(rb"^([^,\n]*),([^,\n]*)", re.MULTILINE)
_NON_BLANK_LINE = re.compile(rb"^[^\S\n]*\S", re.MULTILINE)


@dataclass(frozen=True)
class ImageMeta:
    """Per-image template and media ids (row order = feature order)."""

    names: list[str]
    templates: np.ndarray  # int64 [M]
    medias: np.ndarray  # int64 [M]


@dataclass(frozen=True)
class Landmarks:
    """Five landmarks and the detector (faceness) score per image."""

    points: np.ndarray  # float32 [M,5,2] (x, y) in loose-crop pixels
    scores: np.ndarray  # float64 [M]


@dataclass(frozen=True)
class SearchSet:
    """Templates of a 1:N gallery or probe list with their subject ids (one row per image)."""

    name: str
    templates: np.ndarray  # int64 [R]
    subjects: np.ndarray  # int64 [R]


def ijb_title(prefix: str) -> str:
    """``ijbc`` -> ``IJB-C``, as tables and plots name it."""
    return prefix.upper().replace("IJB", "IJB-")


def meta_path(root: Path, prefix: str, suffix: str) -> Path:
    return Path(root) / "meta" / f"{prefix}_{suffix}"


def _open_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{path}: missing ({what})")
    return path.read_text()


def _bad_line(path: Path, number: int, line: str, expected: str) -> UserError:
    shown = line if len(line) <= 80 else line[:77] + "..."
    return UserError(f"{path}:{number}: expected {expected}, got {shown!r}")


def read_image_meta(root: Path, prefix: str) -> ImageMeta:
    """``P_face_tid_mid.txt``: image name, template id, media id per line."""
    path = meta_path(root, prefix, "face_tid_mid.txt")
    if not path.is_file():
        raise UserError(f"{path}: missing (image to template/media list)")
    data = path.read_bytes()
    if _first_bad_line(data, 3) is None:
        tokens = data.split()
        try:
            ids = np.array(tokens[1::3] + tokens[2::3]).astype(np.int64)
        except (ValueError, OverflowError):
            ids = None
        if ids is not None and tokens:
            try:
                names = [name.decode() for name in tokens[0::3]]
            except UnicodeDecodeError:
                names = None
            if names is not None:
                count = len(names)
                return ImageMeta(names, ids[:count].copy(), ids[count:].copy())
    return _read_image_meta_lines(path, data.decode(errors="replace"))


def _read_image_meta_lines(path: Path, text: str) -> ImageMeta:
    names, templates, medias = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 3:
                raise ValueError
            templates.append(int(fields[1]))
            medias.append(int(fields[2]))
        except ValueError:
            raise _bad_line(path, number, line, "'image_name template_id media_id'") from None
        names.append(fields[0])
    if not names:
        raise UserError(f"{path}: no images listed")
    return ImageMeta(names, np.asarray(templates, np.int64), np.asarray(medias, np.int64))


def read_landmarks(root: Path, prefix: str, names: list[str]) -> Landmarks:
    """``P_name_5pts_score.txt``: landmarks and detector score, checked against the image list."""
    path = meta_path(root, prefix, "name_5pts_score.txt")
    lines = [(n, line) for n, line in
             enumerate(_open_text(path, "landmarks and detector scores").splitlines(), 1)
             if line.strip()]
    if len(lines) != len(names):
        raise UserError(f"{path}: {len(lines)} lines but {len(names)} images in "
                        f"{prefix}_face_tid_mid.txt")
    values = np.empty((len(lines), 11), dtype=np.float64)
    for i, (number, line) in enumerate(lines):
        fields = line.split()
        try:
            if len(fields) != 12:
                raise ValueError
            values[i] = [float(v) for v in fields[1:]]
        except ValueError:
            raise _bad_line(path, number, line, "'image_name x1 y1 ... x5 y5 score'") from None
        if fields[0] != names[i]:
            raise UserError(f"{path}:{number}: image {fields[0]!r} but line {i + 1} of "
                            f"{prefix}_face_tid_mid.txt is {names[i]!r} (orders must match)")
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise _bad_line(path, lines[row][0], lines[row][1], "finite numbers")
    return Landmarks(values[:, :10].reshape(-1, 5, 2).astype(np.float32), values[:, 10])


def read_pairs(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """``P_template_pair_label.txt`` -> (pairs int64 [P,2], labels int8 [P]).

    15.7M lines for IJB-C: parsed in C and checked vectorised; only a bad file is re-read
    line by line to report where.
    """
    path = meta_path(root, prefix, "template_pair_label.txt")
    if not path.is_file():
        raise UserError(f"{path}: missing (1:1 template pairs)")
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(data, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            values = None
    if values is None or _first_bad_line(data, 3) is not None \
            or (len(values) and not 0 <= values[2::3].min() <= values[2::3].max() <= 1):
        _check_pair_lines(path, data)  # raises naming the line
        raise UserError(f"{path}: unreadable pair list")
    if not len(values):
        raise UserError(f"{path}: no pairs listed")
    table = values.reshape(-1, 3)
    return table[:, :2], table[:, 2].astype(np.int8)  # a view: no copy of 250 MB


def _first_bad_line(data: bytes, fields: int, chunk: int = 1 << 20) -> int | None:
    """1-based number of the first non-blank line without exactly ``fields`` tokens.

    Vectorised per 1 MB chunk (token starts summed up to each newline; small enough for the
    temporaries to stay in cache and in reused heap memory), so checking
    IJB-C's 15.7M lines costs a fraction of a second.
    """
    lines_before, pos = 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos + chunk - 1)
        end = len(data) if end < 0 else end + 1
        buf = np.frombuffer(data, np.uint8, count=end - pos, offset=pos)
        token = buf > 32  # tokens are printable; separators are space, tab, CR, LF
        starts = np.empty_like(token)
        starts[0] = token[0]
        np.greater(token[1:], token[:-1], out=starts[1:])  # a token byte after a separator
        newlines = np.flatnonzero(buf == 10)
        # counted modulo 256 (uint8 wraps, and is fastest): exact while no line has 256+
        # tokens, which lines shorter than 511 bytes cannot have
        short = np.diff(newlines, prepend=-1, append=len(buf)).max() < 511
        tokens_so_far = np.cumsum(starts, dtype=np.uint8 if short else np.int64)
        at_ends = np.r_[tokens_so_far[newlines], tokens_so_far[-1]]
        counts = np.diff(at_ends, prepend=at_ends.dtype.type(0))
        bad = np.flatnonzero((counts != 0) & (counts != fields))
        if len(bad):
            return lines_before + int(bad[0]) + 1
        lines_before += len(newlines)
        pos = end
    return None


def _check_pair_lines(path: Path, data: bytes) -> None:
    for number, raw in enumerate(data.decode(errors="replace").splitlines(), 1):
        fields = raw.split()
        if fields and (len(fields) != 3 or fields[2] not in ("0", "1")
                       or not all(f.lstrip("-").isdigit() for f in fields[:2])):
            raise _bad_line(path, number, raw, "'template1 template2 label(0|1)'")


def read_search_set(root: Path, prefix: str, name: str) -> SearchSet:
    """A 1:N CSV (``gallery_G1``, ``probe_mixed``...): header, TEMPLATE_ID, SUBJECT_ID, ..."""
    path = meta_path(root, prefix, f"1N_{name}.csv")
    if not path.is_file():
        raise UserError(f"{path}: missing (1:N protocol list)")
    data = path.read_bytes()
    body = data[data.find(b"\n") + 1:] if b"\n" in data else b""  # line 1 is the header
    fields = _FIRST_TWO_FIELDS.findall(body)
    if fields and len(fields) == len(_NON_BLANK_LINE.findall(body)):
        try:
            ids = np.array(fields).astype(np.int64)
        except (ValueError, OverflowError):
            ids = None
        if ids is not None:
            return SearchSet(name, ids[:, 0].copy(), ids[:, 1].copy())
    lines = data.decode(errors="replace").splitlines()
    templates, subjects = [], []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            if len(fields) < 2:
                raise ValueError
            templates.append(int(fields[0]))
            subjects.append(int(fields[1]))
        except ValueError:
            raise _bad_line(path, number, line, "'TEMPLATE_ID,SUBJECT_ID,...'") from None
    if not templates:
        raise UserError(f"{path}: no templates listed")
    return SearchSet(name, np.asarray(templates, np.int64), np.asarray(subjects, np.int64))


def read_one_to_n(root: Path, prefix: str) -> tuple[SearchSet, SearchSet, SearchSet]:
    """The two galleries and the mixed probe set of the 1:N protocol."""
    first, second = GALLERIES[prefix]
    return (read_search_set(root, prefix, f"gallery_{first}"),
            read_search_set(root, prefix, f"gallery_{second}"),
            read_search_set(root, prefix, "probe_mixed"))
