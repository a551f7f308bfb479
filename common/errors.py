"""The one exception type for bad input, so library code can report it without a CLI."""


class UserError(Exception):
    """Bad input from the user (flag, path, file content): reported in one line, exit 2."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """A library exception's first line, short enough to quote inside a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
