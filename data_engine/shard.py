"""Turn a face dataset into identity-grouped WebDataset shards (contract: ARCHITECTURE.md).

One sample per identity (key = label as 8 digits; 0000.jpg, 0001.jpg, ..., cls, json), labels
0..N-1 in sorted identity-name order. Valid 112x112 JPEGs are stored byte for byte; other
images are converted or rejected (--on-mismatch); every file not stored is listed in
rejected.tsv with the reason, and identities left without images are dropped (listed in
manifest.json). Output: shard-NNNNNN.tar, manifest.json, index.npz, identities.txt,
rejected.tsv (and parts/, the per-shard records used to resume).

Rerunning the same command after a crash or Ctrl-C resumes: finished shards are checked
against their sha256 and kept, the rest are written; the result is byte-identical to an
uninterrupted run, whatever --workers is.

examples:
  python -m data_engine.shard --src webface21m --root /data/WebFace42M --out /data/wf21m
  python -m data_engine.shard --src ms1mv3 --root /data/ms1m-retinaface-t1 --out /data/ms1mv3
  python -m data_engine.shard --src folder --root /data/my_faces --out shards --verify full
  python -m data_engine.shard --src synthetic --identities 1000 --images-per-identity 20 \\
      --seed 0 --out /tmp/synth
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from common.cli import (
    ArgumentParser,
    existing_dir,
    existing_file,
    positive_int,
    run_cli,
    setup_logging,
)
from common.device import usable_cores
from common.errors import UserError
from common.files import WriteError, environment_error, write_error
from common.progress import Progress
from data_engine import layout
from data_engine.writing import output_folder
from data_engine.writing.images import IMAGE_SIZE, ON_MISMATCH, VERIFY_LEVELS
from data_engine.writing.merge import apply_merges, merge_sha256, read_merge
from data_engine.writing.plan import ShardPlan, plan_shards
from data_engine.writing.shardwriter import (
    ShardSummary,
    WriteOptions,
    commit_shard,
    finished_shard,
    init_worker,
    relabel_shard,
    write_shard,
)
from data_engine.writing.sources import SOURCES, Identity, Scan, Source, build_source
from data_engine.writing.workers import Workers
from synthetic.casting import BENCHMARK_FIRST

log = logging.getLogger("data_engine.shard")
_SCAN_PROGRESS_MIN_TASKS = 16
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(value: str) -> int:
    """argparse ``type=`` for sizes such as 1G, 500M, 65536 (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", value.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size (e.g. 1G, 500M, 65536)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return size


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m data_engine.shard", description=__doc__,
                            formatter_class=_HelpFormatter)
    parser.add_argument("--src", required=True, choices=SOURCES,
                        help="dataset layout: webface4m..webface42m (WebFace42M root with "
                             "parts 0..9), folder (root/<identity>/<image>), rec or ms1mv3 "
                             "(insightface train.rec + train.idx), synthetic (generated)")
    parser.add_argument("--root", type=existing_dir, metavar="DIR",
                        help="dataset root (not for synthetic)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output shards directory (created; resumed if it holds this job)")
    parser.add_argument("--shard-size", type=byte_size, default="1G", metavar="SIZE",
                        help="target shard size (e.g. 512M, 2G); shards end near it, and an "
                             "identity never spans two shards")
    parser.add_argument("--verify", choices=VERIFY_LEVELS, default="header",
                        help="JPEG check: none = parse the header for the size only; header "
                             "= also require the end-of-image marker (catches truncation); "
                             "full = also decode every image")
    parser.add_argument("--on-mismatch", choices=ON_MISMATCH, default="resize",
                        help=f"images that are not {IMAGE_SIZE}x{IMAGE_SIZE} colour JPEGs "
                             f"(PNG, grey, CMYK, other sizes): convert to a {IMAGE_SIZE}x"
                             f"{IMAGE_SIZE} JPEG, or list them in rejected.tsv")
    parser.add_argument("--workers", type=positive_int, default=usable_cores(), metavar="N",
                        help="worker processes, all usable cores by default (the output "
                             "does not depend on it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards in a non-empty --out holding another dataset")
    parser.add_argument("--exclude", type=existing_file, metavar="FILE.tsv",
                        help="leave out the images listed here (first tab-separated column: "
                             "the source path as in rejected.tsv, <identity>/<image name>, "
                             "or an identity name for all its images; a header and # lines "
                             "are skipped), e.g. the TSV of python -m evaluate noise cut to "
                             "the rows to drop, or overlap.tsv of python -m evaluate "
                             "duplicates; they go to rejected.tsv with reason 'excluded' or "
                             "'excluded identity'")
    parser.add_argument("--merge", type=existing_file, metavar="FILE.tsv",
                        help="shard the identities named in each line's first two columns "
                             "under one label (the first name in sorted order; the other's "
                             "photos as <name>/<image name>), e.g. duplicates.tsv of python "
                             "-m evaluate duplicates cut to the pairs to merge; listed in "
                             "manifest.json as merged_identities")
    synthetic = parser.add_argument_group("synthetic source")
    synthetic.add_argument("--identities", type=positive_int, default=1000, metavar="N",
                           help="number of generated people")
    synthetic.add_argument("--images-per-identity", type=positive_int, default=20, metavar="M",
                           help="photos per person")
    synthetic.add_argument("--seed", type=int, default=0, metavar="S",
                           help="the dataset is a pure function of this seed")
    synthetic.add_argument("--mislabeled-share", type=_share, default=0.0, metavar="P",
                           help="share of photos filed under the wrong person (planted label "
                                "noise; each image's truth goes into the shard's json)")
    synthetic.add_argument("--duplicate-share", type=_share, default=0.0, metavar="P",
                           help="share of identity names that show another name's person "
                                "(planted duplicate identities, truth in the json)")
    synthetic.add_argument("--plant-benchmark", type=int, default=0, metavar="N",
                           help="add N identity names showing the held-out people that "
                                "python -m evaluate synth-ijb/synth-bin render with the same "
                                "--seed (planted test-set overlap, truth in the json)")
    synthetic.add_argument("--benchmark-first-identity", type=int, default=BENCHMARK_FIRST,
                           metavar="I", help="first held-out person of that benchmark "
                                             "(its --first-identity)")
    return parser


def _share(value: str) -> float:
    """argparse ``type=`` for a share in [0, 1)."""
    try:
        share = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= share < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return share


def read_exclude(path: Path) -> frozenset[str]:
    """The keys of an exclusion list (first column; header, blanks and # lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--exclude {path}: cannot read ({error})") from None
    keys = {line.split("\t", 1)[0] for line in lines if line.strip() and not line.startswith("#")}
    keys -= {"path", "identity"}  # the headers of noise.tsv and overlap.tsv
    return frozenset(keys)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Defaults in the flag help, and the examples in the description kept as written."""


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"format_version": layout.FORMAT_VERSION, "image_size": IMAGE_SIZE,
               "shard_size": args.shard_size, "verify": args.verify,
               "on_mismatch": args.on_mismatch}
    if args.excluded:  # only then: the fingerprint of a run without --exclude is unchanged
        options["exclude_sha256"] = hashlib.sha256(
            "\n".join(sorted(args.excluded)).encode()).hexdigest()
    if args.merges:  # likewise for --merge
        options["merge_sha256"] = merge_sha256(args.merges)
    return options


def _scan(source: Source, workers: int) -> Scan:
    started = time.monotonic()
    with Workers(workers, init_worker, (None, None, None)) as pool:

        def imap(function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
            tasks = list(items)
            results = pool.map(function, tasks, lambda _: "scanning the source")
            # A small root scans in well under a second; a bar would only add log noise.
            return (_counted(results, len(tasks), "scanning", "tasks")
                    if len(tasks) > _SCAN_PROGRESS_MIN_TASKS else results)

        scan = source.scan(imap)
    log.info("scanned %d identities, %d files in %.1fs (%d empty, %d unusable entries)",
             len(scan.identities), sum(i.num_files for i in scan.identities),
             time.monotonic() - started, len(scan.empty), len(scan.rejected))
    return scan


def _counted(results: Iterator[Any], total: int, desc: str, unit: str) -> Iterator[Any]:
    """Pass `results` through while showing progress (scans and checks can take minutes)."""
    with Progress(total, desc, unit=unit) as bar:
        for result in results:
            bar.update()
            yield result


def _write(source: Source, scan: Scan, plans: list[ShardPlan], out: Path,
           args: argparse.Namespace) -> list[ShardSummary]:
    """Keep intact finished shards, write the missing ones in parallel; in plan order.

    Workers only write; this process fsyncs and renames finished shards in a thread, so disk
    writeback overlaps the work on the next shards instead of stalling a worker.
    """
    counter = mp.Value("q", 0)
    options = WriteOptions(out, args.verify, args.on_mismatch, args.excluded)
    shards: list[ShardSummary | None] = [None] * len(plans)
    with ThreadPoolExecutor(2, thread_name_prefix="commit") as committer, \
            Workers(args.workers, init_worker, (source, options, counter)) as pool:
        existing = [plan for plan in plans if layout.sidecar_path(out, plan.name).is_file()]
        checks = pool.map(finished_shard, [(out, plan) for plan in existing],
                          lambda job: f"checking the finished {job[1].name}")
        for plan, summary in zip(existing, _counted(checks, len(existing), "checking finished",
                                                    "shards")):
            shards[plan.index] = summary
        todo = [plan for plan in plans if shards[plan.index] is None]
        log.info("%d shards planned (~%.0f MB), %d already done, %d to write", len(plans),
                 sum(plan.estimated_bytes for plan in plans) / 1e6, len(plans) - len(todo),
                 len(todo))
        if todo:
            (out / layout.MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten
        jobs = [(plan, scan.identities[plan.first:plan.stop]) for plan in todo]
        if jobs:
            for summary in _write_jobs(jobs, pool, committer, counter, out):
                shards[summary.index] = summary
    return _fix_labels([summary for summary in shards if summary is not None], out)


def _write_jobs(jobs: list[tuple[ShardPlan, list[Identity]]], pool: Workers,
                committer: ThreadPoolExecutor, counter: Synchronized,
                out: Path) -> list[ShardSummary]:
    """Workers write the shards; each finished one is committed (fsync, rename, sidecar)
    in a thread while the bar follows the images the workers have done."""
    commits, written = [], set()
    with Progress(sum(plan.num_files for plan, _ in jobs), "sharding", unit="img") as bar:

        def follow() -> None:
            bar.update(counter.value - bar.count)

        results = pool.map(write_shard, jobs, lambda job: f"writing {job[0].name}",
                           ordered=False, tick=follow)
        try:
            for meta in results:
                written.add(meta["index"])
                commits.append(committer.submit(commit_shard, out, meta))
                bar.set_postfix(f"{len(commits)}/{len(jobs)} shards")
                follow()
        except OSError as error:
            raise _out_of_space(error, [plan for plan, _ in jobs
                                        if plan.index not in written], out) from None
        return [commit.result() for commit in commits]


def _out_of_space(error: OSError, unfinished: list[ShardPlan], out: Path) -> OSError:
    """A worker's full disk or read-only --out as one line: the shard, the cause and the
    space the unfinished shards still need (their planned size)."""
    if environment_error(error) is None:
        return error
    needed = sum(plan.estimated_bytes for plan in unfinished)
    return write_error(error.filename or out, error, needed,
                       needed_for=f"for the {len(unfinished)} unfinished shards")


def _fix_labels(shards: list[ShardSummary], out: Path) -> list[ShardSummary]:
    """Keep labels contiguous when identities were dropped after planning (all rejected)."""
    fixed, base = [], 0
    for summary in shards:
        if summary.label_base != base:
            log.info("relabelling %s from %d (earlier identities were dropped)",
                     summary.name, base)
            summary = relabel_shard(out, summary.name, base)
        fixed.append(summary)
        base += len(summary.identities)
    return fixed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    args.excluded = read_exclude(args.exclude) if args.exclude else frozenset()
    args.merges = read_merge(args.merge) if args.merge else []
    source = build_source(args)
    options = _options(args)
    run = {"source": source.describe(), "options": options,
           "fingerprint": output_folder.fingerprint(source.describe(), options)}
    out = args.out
    lock = output_folder.open_out_dir(out, run, args.overwrite)
    started = time.monotonic()
    try:
        scan = _scan(source, args.workers)
        if args.merges:
            scan = apply_merges(scan, args.merges, args.merge)
        plans = plan_shards(scan.identities, args.shard_size, run["fingerprint"])
        output_folder.remove_stale_shards(out, {plan.name for plan in plans})
        shards = _write(source, scan, plans, out, args)
        result = output_folder.write_outputs(out, run, scan, shards)
    except WriteError as error:
        raise WriteError(f"{error}; free space, then rerun the same command (finished "
                         "shards are kept)", error.path) from None
    finally:
        output_folder.remove_temp_files(out)
        os.close(lock)
    log.info("%s complete in %.1fs: %d identities, %d images in %d shards; %d converted, "
             "%d rejected (rejected.tsv), %d identities dropped (manifest.json)", out,
             time.monotonic() - started, result["num_identities"], result["num_images"],
             len(result["shards"]), result["num_converted"], result["num_rejected"],
             len(result["dropped_identities"]))
    return 0


if __name__ == "__main__":
    run_cli("data_engine.shard", main)
