"""Reading the files the package is handed: each behind a size limit checked first (a huge or
endless file is refused in one line), binary ones with `torch.load(weights_only=True)`, so that
reading never runs code. See docs/files.md.
"""

from __future__ import annotations

import os
import pickle
import stat
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import torch

MiB = 2 ** 20
# The largest file of each kind the package reads (far above any it writes).
TEXT_LIMIT = 256 * MiB      # metrics.jsonl, results.jsonl, manifests, records
SMALL_TEXT_LIMIT = 16 * MiB  # loss files, hparams, settings
CHECKPOINT_LIMIT = 16 * 1024 * MiB


class UnreadableFile(ValueError):
    """An input file that is refused unread (too large, not a file) or cannot be decoded;
    `path` and `reason` (the message without them) are kept for callers' own wording."""

    def __init__(self, what: str, path: Path, reason: str):
        super().__init__(f"{what} {path} {reason}")
        self.path, self.reason = path, reason


def check_size(path: Union[str, os.PathLike], limit: int, what: str = "file") -> int:
    """The size of regular file `path`; UnreadableFile when it is not one or exceeds `limit`."""
    path = Path(path)
    info = path.stat()  # FileNotFoundError, PermissionError: the caller's OSError, naming path
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableFile(what, path, "is not a regular file (a device or pipe may never "
                             "end); expected a file")
    if info.st_size > limit:
        raise UnreadableFile(what, path, f"is {info.st_size / MiB:.1f} MiB, more than the "
                             f"{limit / MiB:.0f} MiB such a file can be; expected one this "
                             "package or DomainBed wrote")
    return info.st_size


def read_text(path: Union[str, os.PathLike], limit: int = TEXT_LIMIT, what: str = "file") -> str:
    """The UTF-8 text of `path`, after `check_size`; UnreadableFile for one that is not text."""
    path = Path(path)
    check_size(path, limit, what)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise UnreadableFile(what, path, f"grew beyond {limit / MiB:.0f} MiB while read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableFile(what, path, f"is not a text file ({error.reason})") from None


def load_tensors(path: Union[str, os.PathLike], what: str = "file",
                 limit: int = CHECKPOINT_LIMIT, allowed: Sequence[Any] = (),
                 map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with `allowed` extra globals, after `check_size`.
    UnreadableFile, one line naming the file, for one that holds anything else (refused before
    any of it is used) or is not a torch file at all; OSError as the file system raises it."""
    path = Path(path)
    check_size(path, limit, what)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols of foreign files
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise UnreadableFile(what, path, "holds more than tensors and plain values; "
                                 "refused unread, as reading it could run code") from None
        raise UnreadableFile(what, path, "is not a readable torch file "
                             f"({_first_line(error)})") from None
    except OSError:
        raise
    except Exception as error:  # torch raises many types for damaged or foreign files
        raise UnreadableFile(what, path, "is not a readable torch file "
                             f"({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")
