"""Dataset sources for the sharder, one layout per module."""

from __future__ import annotations

from argparse import Namespace

from common.errors import UserError
from data_engine.writing.sources.base import Identity, Scan, Source, SourceFile
from data_engine.writing.sources.folder import WEBFACE_PARTS, FolderSource
from data_engine.writing.sources.rec import RecordIOSource
from data_engine.writing.sources.synthetic import SyntheticSource

SOURCES = (*WEBFACE_PARTS, "folder", "rec", "ms1mv3", "synthetic")

__all__ = ["SOURCES", "Identity", "Scan", "Source", "SourceFile", "build_source"]


def build_source(args: Namespace) -> Source:
    """The source named by --src, checked against --root / synthetic flags."""
    if args.src == "synthetic":
        if args.root is not None:
            raise UserError("--root is not used with --src synthetic")
        try:
            return SyntheticSource(args.identities, args.images_per_identity, args.seed,
                                   args.mislabeled_share, args.duplicate_share,
                                   args.plant_benchmark, args.benchmark_first_identity)
        except ValueError as error:
            raise UserError(f"--src synthetic: {error}") from None
    if args.root is None:
        raise UserError(f"--root is required with --src {args.src}")
    if args.src in WEBFACE_PARTS:
        return FolderSource(args.root, parts=WEBFACE_PARTS[args.src], kind=args.src)
    if args.src == "folder":
        return FolderSource(args.root)
    return RecordIOSource(args.root, kind=args.src)
