"""One writer per output folder: an operating-system lock, released by the kernel when its holder dies.

See docs/files.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import filelock

from .atomic import write_atomic
from .reading import SMALL_TEXT_LIMIT, read_text

CONTROL_PREFIX = ".domainbed_itl."
LOCK_NAME = CONTROL_PREFIX + "lock"
HOLDER_NAME = CONTROL_PREFIX + "lock.json"


class FolderLocked(RuntimeError):
    """Another process is writing into the folder."""


def is_control_entry(name: str) -> bool:
    """Whether a folder entry is this package's bookkeeping (lock, holder, a run moved aside,
    or the temporary file of one being written)."""
    return name.startswith(".") and name.lstrip(".").startswith(CONTROL_PREFIX[1:])


def current_command() -> str:
    """This process's command line, as a user would type it."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def describe_holder(folder: str | os.PathLike) -> str:
    """Who holds the lock of `folder`, from its holder file (or a note that it says nothing yet)."""
    path = Path(folder) / HOLDER_NAME
    try:
        holder = json.loads(read_text(path, SMALL_TEXT_LIMIT, "lock holder file"))
        return (f"process {holder['pid']} on {holder['host']}, started {holder['started']}, "
                f"command: {holder['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return f"a process that has not yet recorded itself in {path}"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: Optional[str] = None) -> Iterator[Path]:
    """Hold the write lock of `folder` (created if missing) for the block; yields the folder.

    Raises FolderLocked, naming the holder, when another process holds it (or this one does:
    the lock is not re-entrant). A lock file (and folders) this call made is removed again if
    the folder holds nothing else when the block ends, as after a refusal.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    fresh = not os.path.lexists(folder / LOCK_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise FolderLocked(f"{folder} is being written by another process ({describe_holder(folder)}); "
                           "wait for it to finish or use another output folder") from None
    try:
        if not _holds_the_named_file(lock, folder / LOCK_NAME):
            raise FolderLocked(f"{folder} was being given up by another process as this one took "
                               "it; run the command again")
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "command": command or current_command()}
        try:  # a holder file that cannot be written (a full disk) leaves nothing either
            write_atomic(folder / HOLDER_NAME, json.dumps(holder) + "\n", overwrite=True)
            yield folder
        finally:
            (folder / HOLDER_NAME).unlink(missing_ok=True)
            _remove_if_unused(folder, created, fresh)
    finally:
        lock.release()


def _holds_the_named_file(lock: filelock.BaseFileLock, path: Path) -> bool:
    """Whether the file `lock` locked is still the one at `path`: a process that removed its
    lock file (`_remove_if_unused`) may have left another one locking the removed file."""
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    try:
        return fd is None or os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:  # removed
        return False


def _remove_if_unused(folder: Path, created: List[Path], fresh: bool) -> None:
    """Remove the lock file if this call made it (`fresh`), and `folder` and the parents in
    `created` (the lock made them), if nothing but control entries is in the folder; called
    holding the lock, which writes nothing after the lock file is gone. A process that opened
    the lock file just before it was removed finds, once it has the lock, that the file at the
    path is not the one it locked (`_holds_the_named_file`), and stops."""
    if not (created or fresh) or any(not is_control_entry(p.name) for p in folder.iterdir()):
        return
    (folder / LOCK_NAME).unlink(missing_ok=True)
    for made in created:  # deepest first; one that another process wrote into stays
        try:
            made.rmdir()
        except OSError:
            return
