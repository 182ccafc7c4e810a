"""The one exception type bertkit raises for bad input: the CLI prints it in one line and exits non-zero."""

import shutil


class BertkitError(Exception):
    """A user-facing error: the message names the file, the line and what was expected."""


def where(path, line: int | None = None) -> str:
    """Format a 'file:line' location for error messages."""
    return f"{path}:{line}" if line is not None else str(path)


def missing(path, expected: str) -> str:
    """Why `path` is not a file to read: a folder given where its file was meant, or nothing there."""
    return f"{path}: {'a folder, not a file' if path.is_dir() else 'file not found'}; expected {expected}"


def cause(error: BaseException) -> str:
    """A third party's exception in one line: its type and its message's first line (a network library's can run to
    pages)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or ['no message'])[0]}"


def free_space(path) -> str:
    """How much room the filesystem of `path` has left, for an error that a full disk caused."""
    return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB free on its filesystem"
