"""A progress bar over a sweep that advances with its jobs' logged steps, with the time left.

See docs/files.md.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TextIO, Union

from tqdm import tqdm

from .sweepfolder import is_job_folder


def done_in(folders: Iterable[Union[str, os.PathLike]]) -> Callable[[], int]:
    """A counter of the `folders` that hold DomainBed's `done` marker (the jobs of a plan)."""
    markers = [Path(folder) / "done" for folder in folders]
    return lambda: sum(marker.exists() for marker in markers)


def logged_step(folder: Union[str, os.PathLike]) -> int:
    """The training steps a DomainBed job logged: its last record's `step` + 1 (0 without one).

    Only the end of `results.jsonl` is read; a half-written last line is skipped."""
    path = Path(folder) / "results.jsonl"
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 65536))
            lines = file.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"]) + 1
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def steps_done_in(folders: Sequence[Union[str, os.PathLike]], steps: Sequence[int]) -> Callable[[], int]:
    """A counter of the training steps the jobs of `folders` (of `steps` steps each) logged: a
    job's whole `steps` once it wrote `done`, else its `logged_step`."""
    pairs = [(Path(folder), n) for folder, n in zip(folders, steps)]
    return lambda: sum(n if (folder / "done").exists() else min(logged_step(folder), n)
                       for folder, n in pairs)


def done_under(sweep_dir: Union[str, os.PathLike]) -> Callable[[], int]:
    """A counter of the job folders under `sweep_dir` that hold DomainBed's `done` marker (for a
    sweep whose job folders are not known in advance)."""
    root = Path(sweep_dir)

    def count() -> int:
        if not root.is_dir():
            return 0
        return sum(is_job_folder(p) and (p / "done").exists() for p in root.iterdir())
    return count


class JobProgress:
    """A context manager showing the progress of `total` units (jobs, or `unit`s such as
    training steps) as `count_done()` grows.

    The bar starts at the units already done (they do not count towards the rate), is advanced
    by a watcher thread every `interval` seconds (default: one second per thousand units, at
    least one), by `poll()`, and once more on exit. It is written to `file` (default: stderr).
    With `jobs` (a counter of the jobs done, and their number) the bar also shows 'k/n jobs
    done'. With `disable` nothing is shown or watched.
    """

    def __init__(self, count_done: Callable[[], int], total: int, desc: str = "jobs",
                 disable: bool = False, interval: Optional[float] = None,
                 file: Optional[TextIO] = None, unit: str = "job",
                 jobs: Optional[tuple] = None):
        self.count_done, self.total, self.desc, self.disable = count_done, total, desc, disable
        self.file, self.unit, self.jobs = file, unit, jobs
        self.interval = interval if interval is not None else max(1.0, total / 1000)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.bar: Optional[tqdm] = None

    def __enter__(self) -> "JobProgress":
        if self.disable:
            return self
        initial = min(self.count_done(), self.total)
        self.bar = tqdm(total=self.total, initial=initial, desc=self.desc, unit=self.unit, smoothing=0,
                        dynamic_ncols=True, file=self.file)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Advance the bar to the jobs done now."""
        if self.bar is None:
            return
        with self._lock:
            done = min(self.count_done(), self.total)
            if self.jobs is not None:
                count_jobs, n_jobs = self.jobs
                self.bar.set_postfix_str(f"{count_jobs()}/{n_jobs} jobs done", refresh=False)
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is None:
            return
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()


def duration_text(seconds: float) -> str:
    """`seconds` in the largest unit that keeps it readable (s, min, h), for time estimates."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
