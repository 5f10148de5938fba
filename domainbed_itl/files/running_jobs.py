"""Which DomainBed jobs of a sweep are running, which must run again, and which the tables read.

See docs/files.md.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Iterable, List, Optional, Union

from .sweepfolder import is_job_folder

RUNNING_MARKER = "running.pid"
PathLike = Union[str, os.PathLike]


def mark_running(folder: PathLike, pid: int) -> None:
    """Record in job `folder` that process `pid` of this host runs it."""
    (Path(folder) / RUNNING_MARKER).write_text(f"{socket.gethostname()} {pid}\n")


def clear_running(folder: PathLike) -> None:
    """Remove job `folder`'s running marker (its process ended)."""
    try:
        (Path(folder) / RUNNING_MARKER).unlink()
    except FileNotFoundError:
        pass


def _alive(pid: int, folder: Path) -> bool:
    """Whether process `pid` of this host exists and, where /proc tells, runs the job of `folder`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc: the process exists, which is all this host tells
    return folder.name in command


def running(folder: PathLike) -> Optional[str]:
    """Why job `folder` counts as running ('process 123', 'on host h'), or None when it does not:
    no marker, or a marker of this host whose process has ended."""
    folder = Path(folder)
    try:
        host, pid = (folder / RUNNING_MARKER).read_text().split()
        pid_number = int(pid)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname():
        return f"on host {host} (process {pid}), which cannot be checked from here"
    return f"process {pid_number}" if _alive(pid_number, folder) else None


def unfinished(folders: Iterable[PathLike]) -> List[Path]:
    """The `folders` that exist without DomainBed's `done` marker (started, never finished)."""
    return [Path(f) for f in folders if Path(f).is_dir() and not (Path(f) / "done").exists()]


def to_relaunch(folders: Iterable[PathLike]) -> tuple:
    """(the unfinished `folders` that no process runs, which a rerun removes and relaunches;
    the running ones, each as 'folder: why')."""
    idle, busy = [], []
    for folder in unfinished(folders):
        why = running(folder)
        if why:
            busy.append(f"{folder}: running, {why}")
        else:
            idle.append(folder)
    return idle, busy


class JobsStillRunning(RuntimeError):
    """Unfinished jobs of a sweep still run, so nothing may relaunch them yet."""


def clear_for_relaunch(folders: Iterable[PathLike]) -> List[Path]:
    """Remove the folders of the jobs among `folders` that started, did not finish and that no
    process runs, so that a launch runs them again; those removed. While one of them runs,
    raises JobsStillRunning naming each that runs, and removes nothing."""
    idle, busy = to_relaunch(folders)
    if busy:
        raise JobsStillRunning(f"{len(busy)} job(s) still run (a launcher that was stopped left "
                               "them): " + "; ".join(busy) + ". Let them finish or stop them, then "
                               "run this command again")
    return remove_unfinished(idle)


def remove_unfinished(folders: Iterable[PathLike]) -> List[Path]:
    """Remove the folders of unfinished jobs that no process runs (see `to_relaunch`); those
    removed. A job that runs is never removed."""
    idle, _ = to_relaunch(folders)
    for folder in idle:
        if running(folder) is None:
            shutil.rmtree(folder)
    return idle


def finished_view(sweep_dir: PathLike, view: PathLike) -> List[str]:
    """Fill the empty folder `view` with a link to each finished job folder of `sweep_dir` (the
    input for DomainBed's collect_results); the names of the unfinished ones left out."""
    sweep_dir, view = Path(sweep_dir), Path(view)
    left_out = []
    for folder in sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else ():
        if not is_job_folder(folder):
            continue
        if (folder / "done").exists():
            (view / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
        else:
            left_out.append(folder.name)
    return left_out
