"""``python -m data_engine.shard``: turn a face dataset into identity-grouped shards."""

from __future__ import annotations

from collections.abc import Sequence

from common.cli import ArgumentParser, UserError, existing_dir, run_cli, setup_logging

SOURCES = ("webface4m", "webface8m", "webface12m", "webface21m", "webface42m",
           "folder", "rec", "ms1mv3", "synthetic")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m data_engine.shard", description=__doc__)
    parser.add_argument("--src", required=True, choices=SOURCES, help="dataset kind")
    parser.add_argument("--root", type=existing_dir, help="dataset root (not for synthetic)")
    parser.add_argument("--out", required=True, help="output shards directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    raise UserError("sharding is not built yet (issue 3)")


if __name__ == "__main__":
    run_cli("data_engine.shard", main)
