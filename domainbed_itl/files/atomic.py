"""Writing result files atomically: a reader sees the old file, or the whole new one, never half.

See docs/files.md.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union


# Read once: os.umask can only be read by setting it, which other threads would see.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OutputExists(FileExistsError):
    """The output file exists and overwriting it was not asked for."""


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
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
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
                raise OutputExists(f"{path} exists; pass --overwrite to replace it") from None
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
