"""The shards folder's contract: its file names, format version and how to read its manifest.

The only module that knows these names; the writer, the reader, train and evaluate ask it.

    DIR/manifest.json          written last: the sign the folder is complete
    DIR/shard-NNNNNN.tar       one WebDataset sample per identity
    DIR/index.npz              per image: shard, byte offset and byte size (random access)
    DIR/identities.txt         identity names in label order
    DIR/rejected.tsv           every source file that is not in a shard, with the reason
    DIR/parts/run.json         the dataset being written (source + options), from the start
    DIR/parts/shard-NNNNNN.json  a finished shard's sidecar: the commit point on resume
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npz"
IDENTITIES = "identities.txt"
REJECTED = "rejected.tsv"
PARTS_DIR = "parts"
RUN = "run.json"
SHARD_GLOB = "shard-*.tar"
# index.npz arrays. The key of each image's length in bytes is "image_size", fixed by format
# version 1 (the manifest's "image_size" is the side in pixels); the code calls it image_bytes.
INDEX_IMAGE_BYTES = "image_size"
INDEX_ARRAYS = ("identity_start", "image_shard", "image_offset", INDEX_IMAGE_BYTES)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_files(shards_dir: Path) -> list[Path]:
    return sorted(Path(shards_dir).glob(SHARD_GLOB))


def sidecar_path(shards_dir: Path, shard: str) -> Path:
    """``parts/shard-NNNNNN.json`` of shard ``shard``."""
    return Path(shards_dir) / PARTS_DIR / f"{Path(shard).stem}.json"


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """``manifest.json`` of a finished shards folder, or a UserError saying what is wrong."""
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{shards_dir}: not a shards dir (no {MANIFEST}; sharding "
                        "unfinished? rerun python -m data_engine.shard)") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable ({error})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a shards manifest (not a JSON object)")
    return manifest
