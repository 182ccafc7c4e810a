"""The folder a training run writes: checked before any training, and held by one process at a time.

Before training: the path is not a file, not the run's own input folder or inside one, writable, and its
filesystem has room for a checkpoint. While training: a lock file (`.bertkit.lock`) locked with flock(2), which
the kernel releases when its process dies, however it dies; the file keeps the holder's PID for the message, so
a lock left by a killed run is taken over with a notice, and a live one is refused naming its process.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")

LOCK_NAME = ".bertkit.lock"


def check_output_path(out: Path, flag: str, inputs: dict[str, str | None]) -> None:
    """Refuse an output path that is a file, or that is (or is inside) one of the run's `inputs` (flag -> folder):
    a run never writes into the folders it reads."""
    if out.exists() and not out.is_dir():
        raise BertkitError(f"{out}: a file, not a folder; expected a folder for {flag}")
    resolved = out.resolve()
    for name, folder in inputs.items():
        if not folder:
            continue
        source = Path(folder).resolve()
        if resolved == source or source in resolved.parents:
            raise BertkitError(f"{flag} {out} is {'the' if resolved == source else 'inside the'} {name} folder "
                               f"{folder}: the run would write into its own input; expected an output folder "
                               "outside it")


def absolute_paths(values: dict, names) -> dict:
    """`values` (a run's config as saved) with the named path fields made absolute, a list field item by item: whoever
    reads the run folder from another directory finds its inputs, not namesakes there. Unset fields stay unset."""
    out = dict(values)
    for name in names:
        value = out[name]
        if isinstance(value, list):
            out[name] = [str(Path(v).resolve()) for v in value]
        elif value:
            out[name] = str(Path(value).resolve())
    return out


def new_model_folder(out: str, model_dir: str | dict[str, str], overwrite: bool, what: str) -> Path:
    """The --out of a command that writes a model folder from `model_dir` (the `what`; several inputs: a mapping of
    their names to their folders): given, not a file nor inside an input folder, and new or empty unless
    --overwrite."""
    if not out:
        raise BertkitError(f"no output folder; expected --out DIR for the {what}")
    path = Path(out)
    check_output_path(path, "--out", model_dir if isinstance(model_dir, dict) else {"model": model_dir})
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise BertkitError(f"--out {path} holds files; expected an empty or new folder (or --overwrite)")
    return path


def make_dir(path: Path, flag: str) -> None:
    """Create the output folder `path` (and its parents) given by `flag`; one that cannot be is a BertkitError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BertkitError(f"{path}: cannot create the folder ({e.strerror or e}); expected a folder this user can "
                           f"create and write for {flag}") from None


def entries(folder: Path) -> list[str]:
    """The names in `folder` besides the lock file (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


def remove(folder: Path, names) -> list[str]:
    """Delete these files and folders of `folder`; returns the names that were there."""
    removed = []
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start when the filesystem of `folder` has less than `needed` bytes free."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise BertkitError(f"{folder}: {free / 2**30:.2f} GiB free on its filesystem; expected at least "
                           f"{needed / 2**30:.2f} GiB for {what}")


def in_use(folder: Path, holder: str) -> BertkitError:
    return BertkitError(f"{folder}: in use by {holder or 'another process'}; expected one process per run folder "
                        "(wait for it to finish, stop it, or choose another folder)")


def check_not_in_use(folder: Path) -> None:
    """Refuse a run folder whose lock a live run holds, before other checks read its files as a stopped run's
    (creating nothing: a folder without a lock file is held by no one)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise in_use(folder, os.pread(fd, 200, 0).decode("utf-8", "replace").strip()) from None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive hold on a run folder for as long as the run lasts (`with RunLock(folder):`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BertkitError(f"{self.folder}: cannot write there ({e.strerror or e}); expected a folder this "
                               "user can create and write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise in_use(self.folder, holder) from None
        left = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if left:  # written by a holder that never released it: killed, or its machine went down
            logger.warning("%s: took over the lock of %s, which is no longer running", self.folder, left)
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock; the emptied file tells the next run that this one ended cleanly."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
