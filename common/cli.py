"""One way for every CLI to parse flags, report bad input and log.

Conventions (tested in tests/test_cli_conventions.py):
- bad user input -> one line on stderr naming the flag/file and what is wrong, exit 2;
- ``--debug`` shows the full traceback instead;
- Ctrl-C -> one line, exit 130;
- logging goes through :mod:`logging` on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from common.errors import UserError
from common.files import describe

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and adds ``--debug``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # exact flags: a typo is an error, not a guess
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        self.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    def parse_known_args(self, args=None, namespace=None):
        """Name an unknown flag before complaining about missing required ones."""
        args = list(sys.argv[1:] if args is None else args)
        known = {flag for action in self._actions for flag in action.option_strings}
        for arg in args:
            if arg == "--" or (self._subparsers is not None and not arg.startswith("-")):
                break  # the rest belongs to a subcommand, which checks its own flags
            if arg.startswith("-") and len(arg) > 1 and not _looks_like_number(arg):
                flag = arg.split("=", 1)[0]
                if flag not in known:
                    self.error(f"unrecognized argument: {arg}")
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def add_subparsers(parser: ArgumentParser, **kwargs) -> argparse._SubParsersAction:
    """Subcommands that inherit the one-line error behaviour and ``--debug``."""
    kwargs.setdefault("dest", "command")
    kwargs.setdefault("required", True)
    kwargs.setdefault("metavar", "COMMAND")
    return parser.add_subparsers(parser_class=ArgumentParser, **kwargs)


def existing_path(value: str) -> Path:
    """argparse ``type=`` for a file or directory that must exist."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file or directory")
    return path


def existing_dir(value: str) -> Path:
    """argparse ``type=`` for a directory that must exist."""
    path = existing_path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: not a directory")
    return path


def existing_file(value: str) -> Path:
    """argparse ``type=`` for a regular file that must exist."""
    path = existing_path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: not a file")
    return path


def positive_int(value: str) -> int:
    """argparse ``type=`` for an integer > 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return number


def setup_logging(verbose: bool = False) -> None:
    """Log lines on stderr with a timestamp; stdout stays free for results."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int | None],
            argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main(argv)`` under the shared error conventions and exit with its code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = main(args)
    except UserError as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except OSError as error:
        # Full disk, permission denied, vanished file: the user's environment, not our bug.
        if debug:
            raise
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        print(f"{prog}: error: {where}{describe(error)}", file=sys.stderr)
        code = EXIT_USAGE
    except Exception as error:  # last line of defence: one line, not a traceback
        if debug:
            raise
        print(f"{prog}: internal error: {type(error).__name__}: {error} (rerun with --debug "
              "for the traceback)", file=sys.stderr)
        code = 1
    sys.exit(code or 0)
