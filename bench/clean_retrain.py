"""Does cleaning pay? Train, find noise and duplicates, reshard without them, retrain.

One synthetic dataset with planted mislabeled photos and duplicate identities (one person
under two names), the held-out verification .bin and IJB-C set of ``bench.replicate``, and
for each seed:

  1. train AttFC on the dataset as it is (``bench.replicate``'s budget and evaluation);
  2. ``python -m evaluate noise`` and ``python -m evaluate duplicates`` on that run;
  3. reshard with ``--exclude`` (the most suspicious ``--exclude-share`` of the photos) and
     ``--merge`` (every pair duplicates.tsv lists at robust z ``--z``);
  4. retrain with the same flags, seed and epochs on the cleaned shards;
  5. held-out verification accuracy and TAR@FAR before vs after.

Writes OUT/clean_retrain.md (before/after mean ± std over the seeds, per-seed rows, what
was cut and how much of it was planted) and OUT/clean_retrain.json. Rerunning the same
command skips finished steps.

    python -m bench.clean_retrain --out runs/clean --seeds 0 1 2     # the measured loop
    python -m bench.clean_retrain --out /tmp/clean --size tiny       # the test suite's

``--lr-rule`` is ``bench.replicate``'s: ``demo`` (lr 0.1 at B = 16) or ``paper`` (the paper's
lr per sample at this batch, with warm-up).

The last line printed is one JSON object (the table's numbers and the machine).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

from bench.replicate import (
    Run,
    Size,
    _machine,
    _python,
    add_lr_rule_option,
    prepare_data,
    run_one,
)
from common.cli import ArgumentParser, run_cli, setup_logging
from common.files import write_atomic
from common.run_folder import DUPLICATES_DIR, NOISE_DIR
from evaluate.duplicates import DEFAULT_Z

SIZES = {
    "full": Size(identities=500, images_per_identity=6, mislabeled_share=0.1, batch_size=16,
                 epochs=2, ijb_identities=150, bin_identities=150, bin_pairs=1000,
                 seeds=(0, 1, 2)),
    "tiny": Size(identities=16, images_per_identity=4, mislabeled_share=0.15, batch_size=8,
                 epochs=1, ijb_identities=4, bin_identities=6, bin_pairs=20, seeds=(0,)),
}
DUPLICATE_SHARE = 0.05
METRICS = ("accuracy", "tar@0.001", "tar@0.0001")
HEAD = ("--head", "attfc")


def _dataset_flags(size: Size) -> list[str]:
    return ["--src", "synthetic", "--identities", str(size.identities), "--images-per-identity",
            str(size.images_per_identity), "--seed", "0", "--mislabeled-share",
            str(size.mislabeled_share), "--duplicate-share", str(DUPLICATE_SHARE)]


def prepare(out: Path, size: Size) -> dict[str, Path]:
    """The planted shards, then the held-out sets (prepare_data keeps shards it finds)."""
    shards = out / "shards"
    out.mkdir(parents=True, exist_ok=True)
    if not (shards / "manifest.json").is_file():
        print("clean_retrain: sharding the planted dataset", flush=True)
        _python("-m", "data_engine.shard", *_dataset_flags(size), "--out", str(shards),
                log=out / "data.log")
    return prepare_data(out, size)


def clean(run_dir: Path, folder: Path, size: Size, exclude_share: float, z: float,
          device: str) -> dict[str, Any]:
    """Noise and duplicates reports of ``run_dir``, then the cleaned shards in ``folder``."""
    done = folder / "cleaning.json"
    settings = {"exclude_share": exclude_share, "z": z}
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("settings") != settings:
            raise RuntimeError(f"{folder} was cleaned with other settings: remove it or use "
                               "another --out")
        return result
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "clean.log"
    _python("-m", "evaluate", "noise", str(run_dir), log=log)
    _python("-m", "evaluate", "duplicates", str(run_dir), "--device", device, "--workers", "0",
            "--z", str(z), log=log)
    ranked = (run_dir / NOISE_DIR / "noise.tsv").read_text().splitlines()
    cut = round(exclude_share * size.identities * size.images_per_identity)
    write_atomic(folder / "exclude.tsv", ("\n".join(ranked[:cut + 1]) + "\n").encode())
    _python("-m", "data_engine.shard", *_dataset_flags(size), "--out", str(folder / "shards"),
            "--exclude", str(folder / "exclude.tsv"), "--merge",
            str(run_dir / DUPLICATES_DIR / "duplicates.tsv"), log=log)
    noise = json.loads((run_dir / NOISE_DIR / "noise.json").read_text())
    duplicates = json.loads((run_dir / DUPLICATES_DIR / "duplicates.json").read_text())
    planted = [line.split("\t")[-2] for line in ranked[1:cut + 1]]  # planted_mislabeled
    result = {"settings": settings, "excluded_photos": cut,
              "excluded_planted_mislabeled": sum(flag == "1" for flag in planted),
              "planted_mislabeled": (noise.get("planted") or {}).get("mislabeled"),
              "merged_pairs": duplicates["pairs"], "duplicates_truth": duplicates["truth"],
              "duplicates_cut": duplicates["cut"]}
    write_atomic(done, (json.dumps(result, indent=1) + "\n").encode())
    return result


def _mean_std(values: list[float]) -> str:
    return f"{100 * mean(values):.2f} ± {100 * pstdev(values):.2f}" if values else "–"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| data | " + " | ".join(f"{m} %" for m in METRICS) + " | steps |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for when in ("before", "after"):
        cells = [_mean_std([row[when][m] for row in rows]) for m in METRICS]
        steps = "/".join(str(row[when]["steps"]) for row in rows)
        lines.append(f"| {when} cleaning | " + " | ".join(cells) + f" | {steps} |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict[str, Any]], command: str) -> dict[str, Any]:
    machine = _machine()
    per_seed = ["| seed | " + " | ".join(f"{m} before → after %" for m in METRICS)
                + " | photos cut (planted) | pairs merged (planted) |",
                "|---|" + "---|" * (len(METRICS) + 2)]
    for row in rows:
        c = row["cleaning"]
        truth = c["duplicates_truth"] or {}
        per_seed.append(f"| {row['seed']} | " + " | ".join(
            f"{100 * row['before'][m]:.2f} → {100 * row['after'][m]:.2f}" for m in METRICS)
            + f" | {c['excluded_photos']} ({c['excluded_planted_mislabeled']}) | "
            f"{c['merged_pairs']} ({truth.get('found', '–')} of {truth.get('planted', '–')}) |")
    text = "\n".join([f"# Clean and retrain, {len(rows)} seed(s)", "", f"    {command}", "",
                      f"{machine['date']}, commit {machine['commit']}, {machine['cpu']}, "
                      f"{machine['cores']} cores", "", "Held-out people (mean ± std over "
                      "seeds):", "", table(rows), "", per_seed[0], *per_seed[1:], ""])
    write_atomic(out / "clean_retrain.md", text.encode())
    result = {"machine": machine, "rows": rows}
    write_atomic(out / "clean_retrain.json", (json.dumps(result, indent=1) + "\n").encode())
    return result


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m bench.clean_retrain", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/clean_retrain"))
    parser.add_argument("--size", choices=tuple(SIZES), default="full")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the size's")
    parser.add_argument("--exclude-share", type=float, default=0.1,
                        help="share of all photos cut from the top of noise.tsv")
    parser.add_argument("--z", type=float, default=DEFAULT_Z,
                        help="the duplicates report's cut (robust z of the closeness)")
    parser.add_argument("--device", default="cpu")
    add_lr_rule_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    size = SIZES[args.size]
    seeds = tuple(args.seeds) if args.seeds else size.seeds
    out = args.out.resolve()
    data = prepare(out, size)
    rows = []
    for seed in seeds:
        before = run_one(Run(f"before-s{seed}", HEAD, seed), out, data, size, args.device,
                         args.lr_rule)
        cleaning = clean(out / "runs" / f"before-s{seed}", out / f"clean-s{seed}", size,
                         args.exclude_share, args.z, args.device)
        after = run_one(Run(f"after-s{seed}", HEAD, seed), out,
                        {**data, "shards": out / f"clean-s{seed}" / "shards"}, size, args.device,
                        args.lr_rule)
        rows.append({"seed": seed, "before": before, "after": after, "cleaning": cleaning})
    command = (f"python -m bench.clean_retrain --out {args.out} --size {args.size} --seeds "
               f"{' '.join(map(str, seeds))} --exclude-share {args.exclude_share} --z {args.z} "
               f"--device {args.device} --lr-rule {args.lr_rule}")
    result = write_report(out, rows, command)
    print(table(rows))
    print(json.dumps({"machine": result["machine"], "command": command, "seeds": list(seeds),
                      **{f"{when}_{m}": mean(row[when][m] for row in rows)
                         for when in ("before", "after") for m in METRICS}}))
    return 0


if __name__ == "__main__":
    run_cli("bench.clean_retrain", main)
