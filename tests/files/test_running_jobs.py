"""Which jobs of a DomainBed sweep run, which a rerun relaunches, which its table reads
(files/running_jobs.py), without DomainBed: job folders as DomainBed's train leaves them, and
real processes behind the running markers."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from domainbed_itl.files.running_jobs import (RUNNING_MARKER, JobsStillRunning, clear_for_relaunch,
                                              clear_running, finished_view, mark_running,
                                              remove_unfinished, running, to_relaunch, unfinished)

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")


def _sweep(tmp_path):
    """A finished job, one killed after its first checkpoint, one never started, a log folder."""
    done, killed, empty = (tmp_path / "sweep" / h for h in ("a" * 32, "b" * 32, "c" * 32))
    for folder in (done, killed, empty, tmp_path / "sweep" / "submitit"):
        folder.mkdir(parents=True)
    for folder in (done, killed):
        (folder / "results.jsonl").write_text(json.dumps({"step": 0, "env0_out_acc": 0.1}) + "\n")
    (done / "done").write_text("done")
    return done, killed, empty


def _started(folder):
    """A process running a job of `folder`, once it runs its own command (past the fork)."""
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--output_dir",
                            str(folder)])
    deadline = time.monotonic() + 60
    while folder.name not in Path(f"/proc/{job.pid}/cmdline").read_bytes().decode(errors="replace"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_a_marker_counts_while_its_process_runs_the_job(tmp_path):
    _, killed, _ = _sweep(tmp_path)
    assert running(killed) is None
    job = _started(killed)
    try:
        mark_running(killed, job.pid)
        assert running(killed) == f"process {job.pid}"
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        mark_running(killed, other.pid)  # a live process, but not this job's (a reused id)
        assert running(killed) is None
        other.kill()
        other.wait()
        mark_running(killed, job.pid)
    finally:
        job.kill()
        job.wait()
    assert running(killed) is None  # the process ended: the marker is stale
    (killed / RUNNING_MARKER).write_text(f"{socket.gethostname()}-elsewhere 123\n")
    assert "cannot be checked from here" in running(killed)
    clear_running(killed)
    clear_running(killed)  # twice is fine
    assert not (killed / RUNNING_MARKER).exists()


def test_unfinished_jobs_are_relaunched_unless_they_run(tmp_path):
    done, killed, empty = _sweep(tmp_path)
    folders = [done, killed, empty, tmp_path / "sweep" / ("d" * 32)]  # the last: not launched
    assert unfinished(folders) == [killed, empty]
    job = _started(killed)
    try:
        mark_running(killed, job.pid)
        idle, busy = to_relaunch(folders)
        assert idle == [empty] and busy == [f"{killed}: running, process {job.pid}"]
        assert remove_unfinished(folders) == [empty]
        assert killed.exists() and done.exists() and not empty.exists()
    finally:
        job.kill()
        job.wait()
    assert remove_unfinished(folders) == [killed] and not killed.exists() and done.exists()


def test_the_table_reads_finished_jobs_only(tmp_path):
    done, killed, empty = _sweep(tmp_path)
    view = tmp_path / "view"
    view.mkdir()
    assert finished_view(tmp_path / "sweep", view) == [killed.name, empty.name]
    assert [p.name for p in view.iterdir()] == [done.name]
    assert (view / done.name / "results.jsonl").read_text() == (done / "results.jsonl").read_text()
    assert finished_view(tmp_path / "absent", view) == []


def test_clearing_for_a_relaunch_removes_nothing_while_one_job_runs(tmp_path):
    done, killed, empty = _sweep(tmp_path)
    folders = [done, killed, empty]
    job = _started(killed)
    try:
        mark_running(killed, job.pid)
        with pytest.raises(JobsStillRunning) as error:
            clear_for_relaunch(folders)
        assert f"1 job(s) still run (a launcher that was stopped left them): {killed}: running, " \
               f"process {job.pid}. Let them finish" in str(error.value)
        assert all(f.exists() for f in folders)
    finally:
        job.kill()
        job.wait()
    assert clear_for_relaunch(folders) == [killed, empty]
    assert done.exists() and not killed.exists() and not empty.exists()
