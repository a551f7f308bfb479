"""``python -m evaluate``: score a face model on IJB-B/C and the verification sets."""

from __future__ import annotations

from collections.abc import Sequence

from common.cli import (
    ArgumentParser,
    UserError,
    add_subparsers,
    existing_dir,
    run_cli,
    setup_logging,
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m evaluate", description=__doc__)
    commands = add_subparsers(parser)
    for name in ("ijbc", "ijbb"):
        sub = commands.add_parser(name, help=f"{name.upper()} 1:1 and 1:N")
        sub.add_argument("--root", required=True, type=existing_dir, help="IJB directory")
        sub.add_argument("--features", help="precomputed per-image features (.npy)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    raise UserError(f"{args.command} is not built yet (issue 7)")


if __name__ == "__main__":
    run_cli("evaluate", main)
