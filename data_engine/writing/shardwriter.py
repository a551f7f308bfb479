"""Write one planned shard (runs in a worker process), verify or relabel a finished one.

A shard is built under a temp name, fsynced and renamed; then its sidecar
`parts/shard-NNNNNN.json` (plan hash, sha256, per-image offsets, rejected files) is written
the same way. The sidecar is the commit point: a rerun keeps a shard only if its sidecar
matches the plan and the tar still hashes to the recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import numpy as np

from common.files import temp_path, write_atomic
from data_engine.layout import sidecar_path
from data_engine.writing.images import RejectedImageError, prepare
from data_engine.writing.plan import ShardPlan
from data_engine.writing.sources import Identity, Source
from data_engine.writing.tarwriter import TarWriter

Meta = dict[str, Any]


@dataclass(frozen=True)
class WriteOptions:
    out: Path
    verify: str
    on_mismatch: str
    # Source paths or "<identity>/<image name>" keys to leave out (reason "excluded"), or
    # identity names whose photos all stay out (reason "excluded identity").
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ShardSummary:
    """What the manifest and index need from a finished shard, as compact arrays (42M images
    as Python lists of ints in the parent would take gigabytes)."""

    index: int
    name: str
    label_base: int
    bytes: int
    sha256: str
    num_converted: int
    identities: list[str]
    image_counts: np.ndarray  # int64 per identity
    offsets: np.ndarray  # int64 per image: data offset inside the tar
    image_bytes: np.ndarray  # int64 per image: the JPEG's length
    rejected: list[tuple[str, str]]
    dropped: list[tuple[str, str]]


def summarize(meta: Meta) -> ShardSummary:
    samples = meta["samples"]
    return ShardSummary(
        meta["index"], meta["name"], meta["label_base"], meta["bytes"], meta["sha256"],
        meta["num_converted"], [sample[0] for sample in samples],
        np.array([len(sample[2]) for sample in samples], dtype=np.int64),
        np.array([o for sample in samples for o in sample[2]], dtype=np.int64),
        np.array([z for sample in samples for z in sample[3]], dtype=np.int64),
        [tuple(row) for row in meta["rejected"]], [tuple(row) for row in meta["dropped"]])


_worker: dict[str, Any] = {}


def init_worker(source: Source | None, options: WriteOptions | None,
                counter: Synchronized | None) -> None:
    """Pool initializer: Ctrl-C is the parent's to handle; it terminates us and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(source=source, options=options, counter=counter)


def write_json(path: Path, value: Any) -> None:
    """Atomically replace `path` with `value` as JSON (sorted keys: deterministic bytes)."""
    write_atomic(path, json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def write_sample(writer: TarWriter, label: int, identity: str, image_names: list[str],
                 images: list[bytes], image_info: list[Meta] | None = None) -> list[int]:
    """One identity as a WebDataset sample; returns the data offsets of its images.

    ``image_info`` (one dict per image, from sources that know facts about their images,
    e.g. synthetic ground truth) goes into the json as ``image_info``; absent when None.
    """
    key = f"{label:08d}"
    offsets = [writer.add(f"{key}.{j:04d}.jpg", image) for j, image in enumerate(images)]
    writer.add(f"{key}.cls", str(label).encode())
    info: Meta = {"identity": identity, "images": image_names, "label": label}
    if image_info is not None:
        info["image_info"] = image_info
    writer.add(f"{key}.json", json.dumps(info, sort_keys=True, separators=(",", ":")).encode())
    return offsets


def commit_shard(out: Path, meta: Meta) -> ShardSummary:
    """fsync a finished temp tar, rename it into place, then write its sidecar."""
    final = out / meta["name"]
    temp = temp_path(final)
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, final)
    write_json(sidecar_path(out, meta["name"]), meta)
    return summarize(meta)


def write_shard(job: tuple[ShardPlan, list[Identity]]) -> Meta:
    """Read, check and store the identities of one shard under its temp name; returns the
    sidecar for `commit_shard`."""
    plan, identities = job
    source: Source = _worker["source"]
    options: WriteOptions = _worker["options"]
    counter: Synchronized = _worker["counter"]
    writer = TarWriter(temp_path(options.out / plan.name))
    meta: Meta = {"index": plan.index, "name": plan.name, "plan_hash": plan.plan_hash,
                  "label_base": plan.label_base, "samples": [], "rejected": [],
                  "dropped": [], "num_converted": 0}
    verify, on_mismatch, exclude = options.verify, options.on_mismatch, options.exclude
    rejected, samples = meta["rejected"], meta["samples"]
    try:
        label = plan.label_base
        for identity in identities:
            names, images, infos = [], [], []
            for member in identity.members or (identity,):
                # Photos of a name merged into this identity keep that name as a prefix.
                prefix = "" if member.name == identity.name else f"{member.name}/"
                whole = member.name in exclude
                for name, path, data, error, info in source.read_identity(member):
                    if whole:
                        rejected.append([path, "excluded identity"])
                        continue
                    if exclude and (path in exclude or f"{member.name}/{name}" in exclude):
                        rejected.append([path, "excluded"])
                        continue
                    if data is None:
                        rejected.append([path, error])
                        continue
                    try:
                        jpeg, converted = prepare(data, verify=verify, on_mismatch=on_mismatch)
                    except RejectedImageError as reason:
                        rejected.append([path, str(reason)])
                        continue
                    if converted:
                        meta["num_converted"] += 1
                    names.append(prefix + name)
                    images.append(jpeg)
                    infos.append(info)
            with counter.get_lock():
                counter.value += identity.num_files
            if not images:
                meta["dropped"].append([identity.name, "all images rejected"])
                continue
            image_info = infos if any(i is not None for i in infos) else None
            offsets = write_sample(writer, label, identity.name, names, images, image_info)
            sample = [identity.name, names, offsets, [len(i) for i in images]]
            samples.append(sample if image_info is None else [*sample, image_info])
            label += 1
        meta["bytes"], meta["sha256"] = writer.close()
        return meta
    except BaseException as error:
        writer.abort()
        writer.path.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(options.out / plan.name)  # os.write names no file
        raise


def relabel_shard(out: Path, name: str, label_base: int) -> ShardSummary:
    """Rewrite a finished shard with labels from `label_base` (after an earlier shard lost
    an identity whose images were all rejected); image bytes are copied, not re-checked."""
    meta = json.loads(sidecar_path(out, name).read_text(encoding="utf-8"))
    final = out / name
    writer = TarWriter(temp_path(final))
    new = {**meta, "label_base": label_base, "samples": []}
    try:
        with open(final, "rb") as handle:
            fd = handle.fileno()
            for i, (identity, names, offsets, lengths, *info) in enumerate(meta["samples"]):
                images = [os.pread(fd, length, offset) for offset, length in zip(offsets, lengths)]
                new_offsets = write_sample(writer, label_base + i, identity, names, images,
                                           *info)
                new["samples"].append([identity, names, new_offsets, lengths, *info])
        new["bytes"], new["sha256"] = writer.close()
        return commit_shard(out, new)
    except BaseException:
        writer.abort()
        writer.path.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def finished_shard(job: tuple[Path, ShardPlan]) -> ShardSummary | None:
    """The summary of a shard that is complete and intact for this plan, else None."""
    out, plan = job
    try:
        with open(sidecar_path(out, plan.name), encoding="utf-8") as handle:
            meta = json.load(handle)
        shard = out / plan.name
        if (meta.get("plan_hash") != plan.plan_hash
                or shard.stat().st_size != meta.get("bytes")):
            return None
        return summarize(meta) if file_sha256(shard) == meta.get("sha256") else None
    except (OSError, ValueError):
        return None
