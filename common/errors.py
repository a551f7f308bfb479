"""The one exception type for bad input, so library code can report it without a CLI."""


class UserError(Exception):
    """Bad input from the user (flag, path, file content): reported in one line, exit 2."""
