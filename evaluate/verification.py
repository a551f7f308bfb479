"""insightface ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30) and their 10-fold protocol.

A ``.bin`` is a pickle of ``(list of encoded images, list of is-same flags)``. Pickles can run
code, so they are read with an unpickler that admits only the types these files hold; anything
else is refused with a one-line error. Accuracy follows insightface's ``verification.py``:
embeddings L2-normalised, squared distance, thresholds 0..4 step 0.01, 10 consecutive folds,
the threshold picked on 9 folds and applied to the 10th.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.files import write_atomic
from common.progress import Progress

IMAGE_SIZE = 112
# The paper's three, by insightface's file name, with the title its tables use.
VERIFICATION_SETS = {"lfw": "LFW", "cfp_fp": "CFP-FP", "agedb_30": "AgeDB"}


def _bool_scalar(dtype: object, data: bytes) -> bool:
    """numpy.bool_ as pickled by numpy (``multiarray.scalar(dtype('bool'), b'\\x01')``)."""
    if not isinstance(dtype, np.dtype) or dtype.kind != "b" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar that is not a bool")
    return bool(data[:1] != b"\x00")


def _bool_dtype(name: object, *_flags: object) -> np.dtype:
    if name not in ("b1", "?", "bool"):
        raise pickle.UnpicklingError(f"numpy dtype {name!r} (only bool is allowed)")
    return np.dtype(bool)


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """Python 3 pickles bytes at protocol <= 2 as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with anything but a latin1 str")
    return text.encode("latin1")


_ALLOWED = {
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "bytes"): bytes,
    ("builtins", "bool"): bool,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _bool_dtype,
    ("numpy.core.multiarray", "scalar"): _bool_scalar,
    ("numpy._core.multiarray", "scalar"): _bool_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_bin(path: Path) -> tuple[list[bytes], np.ndarray]:
    """The raw encoded images and is-same flags of a ``.bin``, refusing any other content."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # encoding="bytes": Python 2 ``str`` images come back as bytes, not mojibake text.
            data = _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: not an insightface .bin ({error})") from None
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise UserError(f"{path}: expected a pickled (images, issame) pair")
    images, issame = data
    if not isinstance(images, list) or not all(isinstance(b, bytes) for b in images):
        raise UserError(f"{path}: the image list holds something other than bytes")
    if not isinstance(issame, list | tuple) or not all(isinstance(s, bool) for s in issame):
        raise UserError(f"{path}: the issame list holds something other than bools")
    if len(images) != 2 * len(issame):
        raise UserError(f"{path}: {len(images)} images for {len(issame)} pairs "
                        f"(expected {2 * len(issame)})")
    return images, np.asarray(issame, dtype=bool)


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image -> uint8 [3,112,112] RGB (resized when stored at another size)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except OSError as error:
        raise UserError(f"{where}: cannot decode image ({error})") from None
    return array.transpose(2, 0, 1)


def load_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [2P,3,112,112] RGB and issame bool [P] of an insightface ``.bin``."""
    images, issame = read_bin(path)
    out = np.empty((len(images), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    with Progress(len(images), f"decode {Path(path).name}", "img") as progress:
        for i, data in enumerate(images):
            out[i] = decode_image(data, f"{path}: image {i}")
            progress.update()
    return out, issame


def write_bin(path: Path, jpeg_bytes: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write the insightface ``.bin`` format: pickle of (list of bytes, list of bool)."""
    if len(jpeg_bytes) != 2 * len(issame):
        raise ValueError(f"{len(jpeg_bytes)} images for {len(issame)} pairs")
    payload = ([bytes(b) for b in jpeg_bytes], [bool(s) for s in issame])
    write_atomic(Path(path), lambda file: pickle.dump(payload, file, protocol=4))


def _fold_bounds(n: int, nfolds: int) -> list[tuple[int, int]]:
    """Consecutive folds, the first ``n % nfolds`` one longer (sklearn KFold without shuffle)."""
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def evaluate_embeddings(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> dict:
    """10-fold accuracy of pairs (rows 2i, 2i+1): threshold chosen on 9 folds, tested on 1."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or len(embeddings) != 2 * len(issame):
        raise ValueError(f"embeddings {embeddings.shape} do not match {len(issame)} pairs")
    if len(issame) < nfolds:
        raise ValueError(f"{len(issame)} pairs cannot be split into {nfolds} folds")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.maximum(norms, 1e-12)
    dist = np.sum((unit[0::2] - unit[1::2]) ** 2, axis=1)
    thresholds = np.arange(0, 4, 0.01)
    # correct[t, i]: pair i classified right at threshold t (same <=> dist < threshold)
    correct = (dist[None, :] < thresholds[:, None]) == issame[None, :]
    accuracies, chosen = [], []
    for start, end in _fold_bounds(len(issame), nfolds):
        train = np.ones(len(issame), dtype=bool)
        train[start:end] = False
        best = int(np.argmax(correct[:, train].mean(axis=1)))  # first best, as np.argmax
        chosen.append(thresholds[best])
        accuracies.append(correct[best, start:end].mean())
    return {
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "best_threshold": float(np.mean(chosen)),
        "fold_accuracies": [float(a) for a in accuracies],
        "num_pairs": len(issame),
    }


def load_pairs_dir(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """An aligned LFW-style folder: ``ROOT/pairs.txt`` and ``ROOT/NAME/NAME_0001.jpg``.

    pairs.txt lines are ``name i j`` (same person) or ``name1 i name2 j`` (different); an
    optional first line of two integers (folds, pairs per fold) is skipped.
    """
    root = Path(root)
    pairs_file = root / "pairs.txt"
    if not pairs_file.is_file():
        raise UserError(f"{pairs_file}: missing (LFW-style pair list)")
    files, issame = [], []
    for number, line in enumerate(pairs_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or (number == 1 and len(fields) == 2 and all(f.isdigit() for f in fields)):
            continue
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            pair = ((fields[0], fields[1]), (fields[0], fields[2]))
        elif len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit():
            pair = ((fields[0], fields[1]), (fields[2], fields[3]))
        else:
            raise UserError(f"{pairs_file}:{number}: expected 'name i j' or 'name1 i name2 j', "
                            f"got {line!r}")
        files += [root / name / f"{name}_{int(i):04d}.jpg" for name, i in pair]
        issame.append(len(fields) == 3)
    if not issame:
        raise UserError(f"{pairs_file}: no pairs listed")
    out = np.empty((len(files), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    with Progress(len(files), f"decode {root.name}", "img") as progress:
        for i, path in enumerate(files):
            if not path.is_file():
                raise UserError(f"{path}: missing (listed in {pairs_file})")
            out[i] = decode_image(path.read_bytes(), str(path))
            progress.update()
    return out, np.asarray(issame, dtype=bool)
