"""The one exception type bertkit raises for bad input: the CLI prints it in one line and exits non-zero."""


class BertkitError(Exception):
    """A user-facing error: the message names the file, the line and what was expected."""


def where(path, line: int | None = None) -> str:
    """Format a 'file:line' location for error messages."""
    return f"{path}:{line}" if line is not None else str(path)
