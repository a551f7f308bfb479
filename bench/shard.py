"""Sharding files/s against `tar -cf` of the same tree, in the same run (target >= 1x).

Generates a tree of real 112x112 JPEGs (identity folders), reads it once so both sides run
with a warm page cache (dropping the cache needs root and a quiet machine), then times
`python -m data_engine.shard --src folder --verify header` (the full CLI, interpreter start
included) and `tar -cf` alternately, `--repeats` times each, and compares the medians.

Both sides are timed until their output is on disk: the sharder fsyncs every shard (so a
crash never leaves a shard that looks complete), tar -cf does not, so its time includes a
`sync` afterwards. Without that, a tree that fits in RAM lets tar leave its whole archive
as dirty pages for later, which no longer holds at dataset scale (300 GB does not fit in
the page cache). The no-sync tar time is reported too. Every timed run starts after a
`sync`, so neither side pays for the other's writeback.

  .venv/bin/python -m bench.shard                 # 50k files
  .venv/bin/python -m bench.shard --files 20000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg

from bench.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
_DISTINCT_IMAGES = 512


def make_tree(root: Path, files: int, per_identity: int) -> int:
    """Identity folders of 112x112 JPEGs about the size of aligned face crops (~4-8 kB)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(_DISTINCT_IMAGES):
        coarse = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
        image = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        images.append(simplejpeg.encode_jpeg(image, quality=90))
    total = 0
    for i in range(files):
        folder = root / f"id_{i // per_identity:07d}"
        if i % per_identity == 0:
            folder.mkdir(parents=True)
        data = images[i % _DISTINCT_IMAGES]
        (folder / f"{i % per_identity:04d}.jpg").write_bytes(data)
        total += len(data)
    return total


def warm(root: Path) -> None:
    for folder in os.scandir(root):
        for entry in os.scandir(folder.path):
            with open(entry.path, "rb") as handle:
                handle.read()


Timing = tuple[float, float, float]  # exited s, durable s, CPU s (user + sys, all processes)


def timed(command: list[str], **kwargs) -> Timing:
    """Wall seconds until the command exits and until its output is on disk, and the CPU
    seconds it used (comparable on a shared machine, where wall time is not)."""
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, **kwargs)
    exited = time.perf_counter() - started
    os.sync()
    durable = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return exited, durable, cpu


def time_tar(root: Path, work: Path) -> Timing:
    target = work / "tree.tar"
    result = timed(["tar", "-cf", str(target), "-C", str(root.parent), root.name])
    target.unlink()
    return result


def time_ours(root: Path, work: Path, workers: int, shard_size: str) -> Timing:
    out = work / "shards"
    command = [sys.executable, "-m", "data_engine.shard", "--src", "folder", "--root",
               str(root), "--out", str(out), "--verify", "header", "--workers", str(workers),
               "--shard-size", shard_size]
    result = timed(command, cwd=REPO, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50_000, help="JPEGs in the tree (>= 20k)")
    parser.add_argument("--per-identity", type=int, default=40)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", default="16M",
                        help="small enough that the tree makes several shards to spread")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args()
    if args.files < 20_000:
        parser.error("--files must be >= 20000")
    work = Path(tempfile.mkdtemp(prefix="bench_shard_", dir=args.workdir))
    try:
        root = work / "tree"
        total_bytes = make_tree(root, args.files, args.per_identity)
        warm(root)
        ours, tar = [], []
        for _ in range(args.repeats):
            tar.append(time_tar(root, work))
            ours.append(time_ours(root, work, args.workers, args.shard_size))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours_s = statistics.median(durable for _, durable, _ in ours)
    tar_s = statistics.median(durable for _, durable, _ in tar)
    tar_nosync_s = statistics.median(exited for exited, _, _ in tar)
    ours_cpu = statistics.median(cpu for _, _, cpu in ours)
    tar_cpu = statistics.median(cpu for _, _, cpu in tar)
    megabytes = total_bytes / 1e6
    result = {
        "files": args.files, "megabytes": round(megabytes, 1),
        "ours_s": round(ours_s, 3), "tar_s": round(tar_s, 3),
        "tar_nosync_s": round(tar_nosync_s, 3),
        "ours_files_per_s": round(args.files / ours_s),
        "tar_files_per_s": round(args.files / tar_s),
        "tar_nosync_files_per_s": round(args.files / tar_nosync_s),
        "ours_mb_per_s": round(megabytes / ours_s, 1), "tar_mb_per_s": round(megabytes / tar_s, 1),
        "ratio_vs_tar": round(tar_s / ours_s, 3),
        "ratio_vs_tar_nosync": round(tar_nosync_s / ours_s, 3),
        "ours_cpu_us_per_file": round(ours_cpu / args.files * 1e6, 1),
        "tar_cpu_us_per_file": round(tar_cpu / args.files * 1e6, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "workers": args.workers, "verify": "header", "page_cache": "warm",
        "repeats": args.repeats, "cpu": cpu_model(), "cores": os.cpu_count(),
    }
    print(f"tree: {args.files} files, {result['megabytes']} MB (warm page cache); "
          f"median of {args.repeats}, each side timed until its output is on disk")
    print(f"tar -cf + sync:    {tar_s:.3f} s  {result['tar_files_per_s']} files/s "
          f"{result['tar_mb_per_s']} MB/s  (tar -cf alone: {tar_nosync_s:.3f} s)")
    print(f"data_engine.shard: {ours_s:.3f} s  {result['ours_files_per_s']} files/s "
          f"{result['ours_mb_per_s']} MB/s  (CLI incl. interpreter start, "
          f"{args.workers} workers, --verify header, fsync per shard)")
    print(f"CPU per file (user+sys): ours {result['ours_cpu_us_per_file']} us over "
          f"{args.workers} workers, tar {result['tar_cpu_us_per_file']} us on one core; "
          f"load average {result['load_average_1min']}")
    print(f"ratio (tar time / our time): {result['ratio_vs_tar']:.2f}x "
          f"(vs tar -cf without sync: {result['ratio_vs_tar_nosync']:.2f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
