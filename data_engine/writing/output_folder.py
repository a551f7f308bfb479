"""The output folder around the tars: what dataset it holds, and the files readers use.

`parts/run.json` records the dataset (source + options) from the first moment, so a rerun
can tell "resume the same job" from "you pointed --out at something else". manifest.json is
written last and is the sign that the directory is complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.files import TEMP_SUFFIX, fsync_dir, write_atomic
from data_engine.layout import (
    FORMAT_VERSION,
    IDENTITIES,
    INDEX,
    INDEX_IMAGE_BYTES,
    MANIFEST,
    PARTS_DIR,
    REJECTED,
    RUN,
    shard_files,
    sidecar_path,
)
from data_engine.writing.images import IMAGE_SIZE
from data_engine.writing.shardwriter import ShardSummary, write_json
from data_engine.writing.sources import Scan

_OUR_FILES = (MANIFEST, INDEX, IDENTITIES, REJECTED)


def fingerprint(source: dict[str, Any], options: dict[str, Any]) -> str:
    """Hash of everything that changes the output (not --workers, which never does)."""
    text = json.dumps({"source": source, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _recorded(out: Path) -> dict[str, Any] | None:
    """The run record ({source, options, fingerprint}) of what `out` holds, if any."""
    try:
        return json.loads((out / PARTS_DIR / RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    try:  # parts/ deleted by hand: the manifest holds the same record
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return {"source": manifest["source_info"], "options": manifest["options"],
                "fingerprint": manifest["fingerprint"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _differences(recorded: dict[str, Any], run: dict[str, Any]) -> str:
    old = {**recorded.get("source", {}), **recorded.get("options", {})}
    new = {**run["source"], **run["options"]}
    changed = [f"{key}: {old.get(key)} -> {new.get(key)}" for key in sorted(new)
               if old.get(key) != new.get(key)]
    return "; ".join(changed) or "different dataset"


def remove_stale_shards(out: Path, keep: set[str]) -> None:
    """Shards a previous plan had and this one does not (the source shrank)."""
    for path in shard_files(out):
        if path.name not in keep:
            path.unlink()
            sidecar_path(out, path.name).unlink(missing_ok=True)


def remove_outputs(out: Path) -> None:
    """Delete what this tool writes (nothing else) from `out`."""
    for path in [*shard_files(out), *out.glob(f".*{TEMP_SUFFIX}"),
                 *(out / name for name in _OUR_FILES)]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)


def open_out_dir(out: Path, run: dict[str, Any], overwrite: bool) -> int:
    """Create `out` or accept it for resuming `run`; refuse a different dataset's files.

    Returns a descriptor holding an exclusive lock on `out` (close it when done), so two
    runs never write the same shards.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: cannot create it ({error.strerror})") from None
    if not out.is_dir():
        raise UserError(f"--out {out}: not a directory")
    lock = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _accept(out, run, overwrite)
    except BlockingIOError:
        os.close(lock)
        raise UserError(f"--out {out} is being written by another data_engine.shard "
                        "run") from None
    except BaseException:
        os.close(lock)
        raise
    return lock


def _holds_data(out: Path) -> bool:
    """Anything beyond the run record of an attempt that failed before writing a shard."""
    for entry in out.iterdir():
        if entry.name != PARTS_DIR or not entry.is_dir():
            return True
        if any(part.name != RUN for part in entry.iterdir()):
            return True
    return False


def _accept(out: Path, run: dict[str, Any], overwrite: bool) -> None:
    if _holds_data(out):
        recorded = _recorded(out)
        if recorded is None or recorded.get("fingerprint") != run["fingerprint"]:
            if not overwrite:
                what = (_differences(recorded, run) if recorded
                        else "files not written by data_engine.shard")
                raise UserError(f"--out {out} is not empty and holds a different dataset "
                                f"({what}); pass --overwrite to replace it")
            try:
                remove_outputs(out)
            except OSError as error:
                raise UserError(f"--out {out}: cannot clear it ({error.strerror})") from None
    try:
        (out / PARTS_DIR).mkdir(exist_ok=True)
        write_json(out / PARTS_DIR / RUN, run)
        remove_temp_files(out)  # left by a killed run
    except OSError as error:
        raise UserError(f"--out {out}: not writable ({error.strerror})") from None


def remove_temp_files(out: Path) -> None:
    for folder in (out, out / PARTS_DIR):
        for path in folder.glob(f".*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with a fixed timestamp, so the index is byte-identical between runs."""
    archive_bytes = io.BytesIO()
    with zipfile.ZipFile(archive_bytes, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                             buffer.getvalue())
    write_atomic(path, archive_bytes.getvalue())


def _tsv_field(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8", "surrogateescape"))


def write_outputs(out: Path, run: dict[str, Any], scan: Scan,
                  shards: list[ShardSummary]) -> dict:
    """identities.txt, index.npz, rejected.tsv, then manifest.json (the completion mark)."""
    names = [name for shard in shards for name in shard.identities]
    counts = np.concatenate([np.zeros(0, np.int64), *(s.image_counts for s in shards)])
    identity_start = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(counts, out=identity_start[1:])
    _save_npz(out / INDEX, {
        "identity_start": identity_start,
        "image_shard": np.repeat(np.arange(len(shards), dtype=np.int32),
                                 [len(s.offsets) for s in shards]),
        "image_offset": np.concatenate([np.zeros(0, np.int64), *(s.offsets for s in shards)]),
        INDEX_IMAGE_BYTES: np.concatenate([np.zeros(0, np.int64),
                                           *(s.image_bytes for s in shards)]),
    })
    rejected = [*scan.rejected, *(row for shard in shards for row in shard.rejected)]
    dropped = [*({"name": name, "reason": "no files"} for name in scan.empty),
               *({"name": name, "reason": reason} for s in shards for name, reason in s.dropped)]
    _write_text(out / IDENTITIES, "".join(f"{name}\n" for name in names))
    _write_text(out / REJECTED, "path\treason\n" + "".join(
        f"{_tsv_field(path)}\t{_tsv_field(reason)}\n" for path, reason in rejected))
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": run["source"]["kind"],
        "source_info": run["source"],
        "options": run["options"],
        "fingerprint": run["fingerprint"],
        "num_identities": len(names),
        "num_images": int(identity_start[-1]),
        "num_rejected": len(rejected),
        "num_converted": sum(shard.num_converted for shard in shards),
        "dropped_identities": dropped,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "files": {"index": INDEX, "identities": IDENTITIES, "rejected": REJECTED},
        "shards": [{"name": s.name, "num_identities": len(s.identities),
                    "num_images": len(s.offsets), "bytes": s.bytes, "sha256": s.sha256}
                   for s in shards],
    }
    if scan.merged:  # only then: manifests of runs without --merge are unchanged
        manifest["merged_identities"] = [{"name": name, "into": into}
                                         for name, into in scan.merged]
    fsync_dir(out)  # shards and index are durable before the manifest says "complete"
    _write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    fsync_dir(out)
    return manifest
