"""``python -m evaluate``: score a face model on IJB-B/C and the verification sets.

  ijbc / ijbb          IJB 1:1 TAR@FAR and 1:N top-k, TPIR@FPIR (insightface protocol)
  lfw / cfp_fp / agedb_30   10-fold verification accuracy on an insightface .bin
  synth-ijb / synth-bin     write synthetic benchmarks in those formats (held-out people)
  report RUN                RUN/report.md with plots and the paper-format results table
  noise RUN                 RUN/noise/: photos attention found least like their label (TSV,
                            thumbnails; precision/recall at K on planted synthetic noise)
  duplicates RUN            RUN/duplicates/: identity names showing one person, and (with
                            --against) training people who are in the evaluation sets
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common.cli import (
    ArgumentParser,
    add_subparsers,
    existing_dir,
    existing_file,
    positive_int,
    run_cli,
    setup_logging,
)
from common.errors import UserError
from common.files import write_atomic
from evaluate.ijb_meta import IJB_SETS, ijb_title
from evaluate.onnx_model import INPUT_RANGES
from evaluate.verification import VERIFICATION_SETS

log = logging.getLogger("evaluate")

MODEL_HELP = ("RUN/model.pt, an insightface-style PyTorch state_dict (backbone.pth, with "
              "--network) or an ONNX recognition model (.onnx)")


def _add_model_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--network",
                     help="backbone of PyTorch weights; when omitted, RUN/model.json next to "
                     "--model, else r50 (an ONNX model carries its own)")
    sub.add_argument("--onnx-input", choices=INPUT_RANGES, default="auto",
                     help="pixel scale an ONNX model takes: raw 0-255, or scaled to [-1, 1]; "
                     "auto detects it as insightface does (first nodes Sub and Mul: raw)")
    sub.add_argument("--device", default="auto",
                     help="auto, cpu or cuda[:N]: runs the network and the faiss 1:N search")
    sub.add_argument("--batch-size", type=positive_int, default=256)
    sub.add_argument("--no-flip", dest="flip", action="store_false",
                     help="skip the flip test (published numbers use it)")
    sub.add_argument("--out", type=Path, help="write the metrics as JSON here")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m evaluate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = add_subparsers(parser)
    for name in IJB_SETS:
        sub = commands.add_parser(name, help=f"{ijb_title(name)} 1:1 and 1:N (insightface "
                                  "layout)")
        sub.add_argument("--root", required=True, type=existing_dir,
                         help="directory with meta/ and loose_crop/")
        source = sub.add_mutually_exclusive_group(required=True)
        source.add_argument("--model", type=existing_file, help=MODEL_HELP)
        source.add_argument("--features", type=existing_file,
                            help="precomputed per-image features .npy [images, D]")
        sub.add_argument("--faceness", type=existing_file,
                         help="per-image detector scores .npy; when omitted, the last column "
                              f"of meta/{name}_name_5pts_score.txt")
        sub.add_argument("--no-detector-score", dest="detector_score", action="store_false",
                         help="do not weight image features by detector score")
        sub.add_argument("--cache", type=Path,
                         help="per-image feature cache .npy; when omitted, "
                              f"{name}_features.npy next to --model")
        sub.add_argument("--no-cache", action="store_true", help="always run the network")
        sub.add_argument("--distractors", type=existing_file,
                         help="extra 1:N gallery features .npy [N, D] (memory-mapped)")
        sub.add_argument("--open-set", action="store_true",
                         help="also report stricter open-set 1:N (G1, G2 searched separately)")
        sub.add_argument("--plot", type=Path, help="write the ROC curve (TAR vs FAR) here")
        sub.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                         help="threads decoding and aligning loose crops")
        _add_model_flags(sub)
    for name in VERIFICATION_SETS:
        sub = commands.add_parser(name, help=f"{name} 10-fold verification accuracy")
        source = sub.add_mutually_exclusive_group(required=True)
        source.add_argument("--bin", type=existing_file, help="insightface .bin file")
        source.add_argument("--pairs", type=existing_dir,
                            help="aligned LFW-style folder with pairs.txt")
        sub.add_argument("--model", type=existing_file, required=True,
                         help=MODEL_HELP)
        _add_model_flags(sub)
    synth = commands.add_parser("synth-ijb", help="write a synthetic IJB-layout directory")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--identities", type=positive_int, default=50)
    synth.add_argument("--first-identity", type=int, default=100_000,
                       help="first synthetic identity (beyond the training ones = held out)")
    synth.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    synth.add_argument("--probes", type=positive_int, default=2, help="probe templates/subject")
    synth.add_argument("--prefix", choices=IJB_SETS, default="ijbc")
    synth_bin = commands.add_parser("synth-bin", help="write a synthetic verification .bin")
    synth_bin.add_argument("--out", type=Path, required=True)
    synth_bin.add_argument("--identities", type=positive_int, default=100)
    synth_bin.add_argument("--first-identity", type=int, default=100_000)
    synth_bin.add_argument("--pairs", type=positive_int, default=600)
    synth_bin.add_argument("--seed", type=int, default=0)
    noise = commands.add_parser("noise", help="rank an attfc run's likely mislabeled or "
                                "unusable photos (RUN/noise/)")
    noise.add_argument("run", type=existing_dir, metavar="RUN",
                       help="attfc training run with RUN/image_stats.npz")
    noise.add_argument("--shards", type=existing_dir,
                       help="the run's shards (default: 'shards' in RUN/config.toml)")
    noise.add_argument("--thumbnails", type=positive_int, default=24,
                       help="suspects shown on the thumbnail page")
    _add_duplicates(commands)
    report = commands.add_parser("report", help="write RUN/report.md with plots for a run")
    report.add_argument("run", type=existing_dir, metavar="RUN",
                        help="training run directory (evaluations read from RUN/eval/*.json)")
    return parser


def _add_duplicates(commands) -> None:
    from evaluate.duplicates import DEFAULT_Z

    sub = commands.add_parser("duplicates", help="identity names showing one person and "
                              "overlap with evaluation sets, by faiss over identity centres "
                              "(RUN/duplicates/)")
    sub.add_argument("run", type=existing_dir, metavar="RUN", help="training run with model.pt")
    sub.add_argument("--shards", type=existing_dir,
                     help="the run's shards (default: 'shards' in RUN/config.toml)")
    sub.add_argument("--model", type=existing_file, help="default RUN/model.pt")
    sub.add_argument("--out", type=Path, help="output folder (default RUN/duplicates)")
    sub.add_argument("--against", type=Path, action="append", metavar="PATH",
                     help="an insightface .bin, an IJB root, or a folder of them; repeatable")
    sub.add_argument("--neighbours", type=positive_int, default=10,
                     help="nearest identities searched per identity")
    sub.add_argument("--z", type=float, default=DEFAULT_Z,
                     help="robust z-score cut among the nearest-neighbour cosines")
    sub.add_argument("--threshold", type=float, metavar="COS",
                     help="a cosine cut instead of --z (pick it from the histogram)")
    sub.add_argument("--thumbnails", type=positive_int, default=16,
                     help="matches shown on the thumbnail pages")
    sub.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="loader decode workers (0: decode in this process)")
    sub.add_argument("--device", default="auto",
                     help="auto, cpu or cuda[:N] (cuda also puts the faiss index on the GPU)")
    sub.add_argument("--batch-size", type=positive_int, default=256)
    sub.add_argument("--no-flip", dest="flip", action="store_false",
                     help="skip the flip test")


def run_duplicates(args: argparse.Namespace) -> int:
    from evaluate.duplicates import write_duplicates

    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be >= 0")
    page = write_duplicates(args.run, shards_dir=args.shards, out_dir=args.out,
                            model=args.model, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, neighbours_k=args.neighbours, z=args.z,
                            threshold=args.threshold, against=args.against,
                            thumbnails=args.thumbnails, flip=args.flip)
    print(f"duplicates report written to {page}")
    return 0


def _load_matrix(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UserError(f"{path}: not a .npy {what} ({error})") from None


def _embedder(args: argparse.Namespace):
    from evaluate.features import load_embedder

    return load_embedder(args.model, network=args.network, device=args.device,
                         onnx_input=args.onnx_input)


def run_ijb(args: argparse.Namespace) -> int:
    from evaluate import ijb, ijb_meta
    from evaluate.roc import roc_points
    from evaluate.templates import pool_templates

    prefix, root = args.command, args.root
    with ThreadPoolExecutor(1) as reader:
        # The 1:1 and 1:N lists (15.7M pair lines for IJB-C) are parsed in a second thread
        # (numpy's parsing releases the GIL) while this one reads the images and features
        # and pools the templates.
        reading = reader.submit(ijb.read_protocol, root, prefix)
        images = ijb_meta.read_image_meta(root, prefix)
        if args.model is not None:
            reading.result()  # before the network: bad meta fails fast
        features, faceness = _ijb_inputs(args, images)
        distractors = None if args.distractors is None else _load_matrix(args.distractors,
                                                                         "distractor matrix")
        pooled = pool_templates(features, images.templates, images.medias, faceness)
        result = ijb.score_templates(pooled, reading.result(), distractors=distractors,
                                     open_set=args.open_set, full_roc=args.plot is not None,
                                     device=args.device)
    gallery = "+".join(ijb_meta.GALLERIES[prefix])
    if distractors is not None:
        gallery += f" + {len(distractors)} distractors"
    print(format_ijb_table(ijb_title(prefix), result.metrics, gallery))
    if args.out:
        _write_json(args.out, {**result.metrics, "roc": roc_points(result.fpr, result.tpr)})
    if args.plot:
        from evaluate.roc import plot_roc

        label = Path(args.model or args.features).name
        plot_roc({label: (result.fpr, result.tpr)}, str(args.plot),
                 f"{ijb_title(prefix)} 1:1 ROC")
        log.info("ROC plot written to %s", args.plot)
    return 0


def _ijb_inputs(args: argparse.Namespace, images) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-image features (the network's, cached, or --features) and detector scores."""
    from evaluate import ijb, ijb_meta

    prefix, root = args.command, args.root
    tid_mid = ijb_meta.meta_path(root, prefix, "face_tid_mid.txt")
    landmarks = None
    if args.model is not None or (args.detector_score and args.faceness is None):
        landmarks = ijb_meta.read_landmarks(root, prefix, images.names)
    if args.model is not None:
        from evaluate.features import cached_features  # torch: only when a network runs

        embed = _embedder(args)
        model = Path(args.model).resolve()
        cache = None if args.no_cache else (args.cache or model.parent / f"{prefix}_features.npy")
        key = {"model": str(model), "model_mtime_ns": model.stat().st_mtime_ns,
               "network": args.network, "root": str(Path(root).resolve()),
               "images": len(images.names), "flip": args.flip, "onnx_input": args.onnx_input}
        features = cached_features(cache, key, lambda: ijb.model_features(
            root, prefix, images.names, landmarks.points, embed, batch_size=args.batch_size,
            flip=args.flip, workers=args.workers))
    else:
        features = _load_matrix(args.features, "feature matrix")
        if features.ndim != 2 or len(features) != len(images.names):
            raise UserError(f"{args.features}: {features.shape[0] if features.ndim else 0} "
                            f"feature rows but {tid_mid} lists {len(images.names)} images")
    faceness = None
    if args.detector_score:
        if args.faceness is not None:
            faceness = np.asarray(_load_matrix(args.faceness, "score vector"), np.float64)
            if faceness.shape != (len(images.names),):
                raise UserError(f"{args.faceness}: shape {faceness.shape} but {tid_mid} lists "
                                f"{len(images.names)} images")
        else:
            faceness = landmarks.scores
    return np.asarray(features), faceness


def format_ijb_table(title: str, metrics: dict, gallery: str) -> str:
    """Percent table in the layout of the published IJB tables."""
    fars = list(metrics["tar_at_far"])
    lines = [f"{title} 1:1 verification, TAR (%) @ FAR",
             "  " + "".join(f"{far:>10}" for far in fars),
             "  " + "".join(f"{100 * v:>10.2f}" for v in metrics["tar_at_far"].values()),
             f"{title} 1:N identification (closed set, gallery {gallery}), %",
             f"  {'top1':>10}{'top5':>10}{'top10':>10}"
             + "".join(f"{'TPIR@' + k:>14}" for k in metrics["tpir_at_fpir"]),
             f"  {100 * metrics['top1']:>10.2f}{100 * metrics['top5']:>10.2f}"
             f"{100 * metrics['top10']:>10.2f}"
             + "".join(f"{100 * v:>14.2f}" for v in metrics["tpir_at_fpir"].values())]
    for gallery, numbers in metrics.get("open_set", {}).items():
        lines.append(f"{title} 1:N OPEN SET, gallery {gallery} only, %: top1 "
                     f"{100 * numbers['top1']:.2f}  " + "  ".join(
                         f"TPIR@FPIR={k} {100 * v:.2f}"
                         for k, v in numbers["tpir_at_fpir"].items()))
    return "\n".join(lines)


def run_verification(args: argparse.Namespace) -> int:
    from evaluate.features import extract_features
    from evaluate.verification import evaluate_embeddings, load_bin, load_pairs_dir

    images, issame = load_bin(args.bin) if args.bin else load_pairs_dir(args.pairs)
    features = extract_features(_embedder(args), images, batch_size=args.batch_size,
                                flip=args.flip, desc=f"{args.command} features")
    metrics = evaluate_embeddings(features, issame)
    print(f"{args.command}: accuracy {100 * metrics['accuracy_mean']:.2f} ± "
          f"{100 * metrics['accuracy_std']:.2f} % over {metrics['num_pairs']} pairs "
          f"(10 folds, flip test {'on' if args.flip else 'off'})")
    if args.out:
        _write_json(args.out, metrics)
    return 0


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
    log.info("metrics written to %s", path)


def run_synthetic(args: argparse.Namespace) -> int:
    from evaluate.synthetic_ijb import write_synthetic_bin, write_synthetic_ijb

    if args.identities < 2:
        raise UserError("--identities must be at least 2 (impostor pairs need two people)")
    if args.first_identity < 0:
        raise UserError("--first-identity must be >= 0")
    if args.command == "synth-ijb":
        counts = write_synthetic_ijb(args.out, identities=args.identities, seed=args.seed,
                                     first_identity=args.first_identity, prefix=args.prefix,
                                     probes=args.probes)
    else:
        counts = write_synthetic_bin(args.out, identities=args.identities, seed=args.seed,
                                     first_identity=args.first_identity, pairs=args.pairs)
    print(f"wrote {args.out}: " + ", ".join(f"{v} {k.replace('_', ' ')}"
                                             for k, v in counts.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # CPU-feature probing noise
    if args.command in IJB_SETS:
        return run_ijb(args)
    if args.command in VERIFICATION_SETS:
        return run_verification(args)
    if args.command == "noise":
        from evaluate.noise import write_noise

        print(f"noise report written to {write_noise(args.run, args.shards, args.thumbnails)}")
        return 0
    if args.command == "duplicates":
        return run_duplicates(args)
    if args.command == "report":
        from evaluate.report import write_report

        print(f"report written to {write_report(args.run)}")
        return 0
    return run_synthetic(args)


if __name__ == "__main__":
    run_cli("evaluate", main)
