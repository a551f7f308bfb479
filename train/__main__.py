"""``python -m train``: train a face recognition model on identity-grouped shards."""

from __future__ import annotations

from collections.abc import Sequence

from common.cli import ArgumentParser, UserError, existing_dir, run_cli, setup_logging


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--shards", required=True, type=existing_dir, help="shards directory")
    parser.add_argument("--output", default="runs/latest", help="run directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    raise UserError("training is not built yet (issue 6)")


if __name__ == "__main__":
    run_cli("train", main)
