"""The one way a command writes an output file: planned before any work, then written atomically.

See docs/files.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Sequence, Set, Tuple, Union

from .atomic import OutputExists, write_atomic
from .errors import OVERWRITE

PathLike = Union[str, os.PathLike]


class OutputError(ValueError):
    """An output path that cannot be written (its folder, its format); the message names it."""


def figure_formats() -> Tuple[str, ...]:
    """The figure formats matplotlib writes, as file extensions without the dot."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def figure_format(path: PathLike) -> str:
    """The format of the figure file `path` (its extension); OutputError unless matplotlib
    writes it."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    formats = figure_formats()
    if suffix not in formats:
        what = "has no extension" if not suffix else f"has the extension .{suffix}, which " \
                                                      "matplotlib cannot write"
        raise OutputError(f"figure path {path} {what}; expected a file name ending in one of "
                          f"{', '.join('.' + f for f in formats)}")
    return suffix


def nearest_existing(path: Path) -> Path:
    """`path`'s nearest ancestor that exists (the folder its parents would be made in)."""
    for ancestor in path.absolute().parents:
        if os.path.lexists(ancestor):
            return ancestor
    return Path(path.absolute().anchor)


def check_output_path(path: PathLike) -> None:
    """OutputError naming `path` unless a file can be written there: it is not a folder, and
    its parent folder exists or can be made by this process."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output path {path} is a folder; expected a file name")
    ancestor = nearest_existing(path)
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {ancestor}")


class OutputPlan:
    """The checked output paths of a command (`plan_outputs`) and their writer."""

    def __init__(self, paths: Sequence[PathLike], overwrite: bool):
        self.paths: Tuple[Path, ...] = tuple(Path(p) for p in paths)
        self.overwrite = overwrite
        self._own: Set[Path] = set()

    def write(self, path: PathLike, data: Union[bytes, str]) -> Path:
        """Write `data` to the planned `path` atomically (docs/files.md)."""
        path = Path(path)
        if path not in self.paths:
            raise RuntimeError(f"{path} is not among the planned outputs {list(map(str, self.paths))}")
        write_atomic(path, data, overwrite=self.overwrite or path in self._own)
        self._own.add(path)
        return path


def plan_outputs(paths: Iterable[PathLike], overwrite: bool = False,
                 figures: Iterable[PathLike] = ()) -> OutputPlan:
    """Check the output `paths` (and the formats of `figures`, some of them) before any work;
    OutputError or OutputExists naming the first problem (docs/files.md)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_output_path(path)
    for figure in figures:
        figure_format(figure)
    if not overwrite:
        taken: List[str] = [str(p) for p in paths if os.path.lexists(p)]
        if taken:
            raise OutputExists(f"{', '.join(taken)} exist{'s' if len(taken) == 1 else ''}; pass "
                               f"{OVERWRITE} to replace, or choose another output", paths=taken)
    return OutputPlan(paths, overwrite)
