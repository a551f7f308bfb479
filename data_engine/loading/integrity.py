"""Start-up checks of a shards folder against its manifest: seconds, not hours into a run.

An interrupted copy or a damaged disk shows as a shard whose size (or sha256) differs from
what ``manifest.json`` recorded when the shard was written; without this the loader would
only meet the missing bytes when it reaches them, possibly a day into training.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.progress import Progress
from data_engine.layout import read_manifest

_CHUNK = 8 << 20


def check_shards(shards_dir: str | os.PathLike, *, hashes: bool = False) -> dict[str, Any]:
    """Compare every shard's size (and, with ``hashes``, its sha256) with ``manifest.json``;
    a mismatch is a UserError naming the shard and both values. Returns what identifies
    the dataset wherever the folder is copied (``fingerprint``, ``num_identities``,
    ``num_images``), for a resumed run to compare with the one it was trained on."""
    root = Path(shards_dir)
    manifest = read_manifest(root)
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        raise UserError(f"{root / 'manifest.json'}: no shard list (rerun python -m "
                        "data_engine.shard)")
    for number, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise UserError(f"{root / 'manifest.json'}: shard entry {number} is not "
                            "{name, bytes, sha256} (edited or damaged? rerun python -m "
                            "data_engine.shard)")
    total = 0
    for entry in entries:
        path = root / entry["name"]
        try:
            size = path.stat().st_size
        except OSError as error:
            raise UserError(f"{path}: cannot read shard ({error.strerror})") from None
        if size != entry["bytes"]:
            raise UserError(f"{path}: {size} bytes, manifest.json says {entry['bytes']} "
                            "(truncated or replaced copy? copy it again or rerun python -m "
                            "data_engine.shard)")
        total += size
    if hashes:
        with Progress(total, "verifying shards", unit="B") as progress:
            for entry in entries:
                path = root / entry["name"]
                digest = _sha256(path, progress)
                if digest != entry["sha256"]:
                    raise UserError(f"{path}: sha256 {digest}, manifest.json says "
                                    f"{entry['sha256']} (damaged copy? copy it again or rerun "
                                    "python -m data_engine.shard)")
    return {key: manifest.get(key) for key in ("fingerprint", "num_identities", "num_images")}


def _sha256(path: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()
