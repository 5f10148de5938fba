"""Writing result files atomically: a reader sees the old file, or the whole new one, never half.

See docs/files.md.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Union

from .errors import OVERWRITE, Worded


# Read once: os.umask can only be read by setting it, which other threads would see.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# What to do about an OSError that the machine, not the input, causes.
FAULT_HINTS = {errno.ENOSPC: "free space there or write elsewhere",
               errno.EDQUOT: "free space there or write elsewhere",
               errno.EROFS: "the folder is read-only; write elsewhere",
               errno.EACCES: "this user may not write there; write elsewhere",
               errno.EPERM: "this user may not write there; write elsewhere"}


class OutputExists(Worded, FileExistsError):
    """The output file exists and overwriting it was not asked for; `remedy` names `overwrite`,
    `paths` (when given) the files."""


def machine_fault(error: OSError, path: Union[str, os.PathLike, None] = None) -> str:
    """One line for an OSError of the machine: what happened, the path (the error's, else
    `path`) and what to do."""
    where = error.filename if error.filename else path
    text = error.strerror or str(error) or type(error).__name__
    hint = FAULT_HINTS.get(error.errno or 0)
    return (f"{text}" + (f" writing {where}" if where else "")
            + (f" ({hint})" if hint else ""))


def _naming(error: OSError, path: Path) -> OSError:
    """`error` with `path` as its filename when it names none (a full disk's write names none)."""
    if error.filename or error.errno is None:
        return error
    named = OSError(error.errno, error.strerror, str(path))
    named.__cause__ = error
    return named


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str], overwrite: bool = False,
                 mode: Optional[int] = None) -> Path:
    """Write `data` to `path` through a temporary file in the same folder.

    Without `overwrite`, an existing `path` is never replaced: `OutputExists` is raised, also when
    another process creates the file while this one writes (the final step is a hard link, which
    fails rather than replaces). With `overwrite`, the final step is os.replace. Text is written
    as UTF-8. The file gets the usual umask-governed permissions, or `mode` when given.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExists(f"{path} exists; pass {OVERWRITE} to replace it", paths=[path])
    created = [p for p in path.parents if not os.path.lexists(p)]
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, payload, overwrite, mode)
    except OSError as error:
        _remove_empty(created)
        if isinstance(error, OutputExists):
            raise
        raise _naming(error, path) from None
    except BaseException:
        _remove_empty(created)
        raise
    return path


def _remove_empty(folders: List[Path]) -> None:
    """Remove the `folders` (deepest first) that a failed write created, if still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _write(path: Path, payload: bytes, overwrite: bool, mode: Optional[int]) -> None:
    """write_atomic's temporary file, then its final step; the temporary file never stays."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExists(f"{path} exists; pass {OVERWRITE} to replace it", paths=[path]) from None
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
