"""One writer per output folder: the lock names its holder, and dies with it."""

from __future__ import annotations

import os
import signal
import socket
import time

import filelock
import pytest
from conftest import hold_lock

from domainbed_itl.files.runlock import (HOLDER_NAME, LOCK_NAME, FolderLocked, _holds_the_named_file,
                                         folder_lock, is_control_entry)

def test_a_second_writer_is_refused_by_name_until_the_holder_dies(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(FolderLocked) as error:
            with folder_lock(tmp_path / "run"):
                pass
        message = str(error.value)
        assert f"process {holder.pid} on {socket.gethostname()}, started 20" in message
        assert f"command: holder --of {tmp_path / 'run'}" in message
        assert "wait for it to finish or use another output folder" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 30  # the kernel releases a dead process's lock: no stale lock
    with folder_lock(tmp_path / "run"):
        assert time.time() < deadline
        assert str(os.getpid()) in (tmp_path / "run" / HOLDER_NAME).read_text()


def test_lock_is_taken_once_even_in_process_and_leaves_no_lock_file_it_made_in_an_empty_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    with folder_lock(tmp_path / "a" / "b", command="outer") as folder:
        with pytest.raises(FolderLocked, match="command: outer"):
            with folder_lock(folder, command="inner"):
                pass
        assert "outer" in (folder / HOLDER_NAME).read_text()  # the refusal changed nothing
    assert list(folder.iterdir()) == []  # the folder as it was: the lock file made is gone
    with folder_lock(folder):  # released: taken again at once
        (folder / "result.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "result.txt"]
    (folder / "result.txt").unlink()
    with folder_lock(folder):  # a lock file this call did not make stays (another may wait on it)
        pass
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


def test_a_lock_on_a_removed_lock_file_is_noticed(tmp_path):
    """The race of removing a lock file: a process that locks the file after its holder removed
    it holds nothing; it sees that the file at the path is not the one it locked."""
    path = tmp_path / LOCK_NAME
    lock = filelock.FileLock(str(path))
    lock.acquire(timeout=0)
    try:
        assert _holds_the_named_file(lock, path)
        path.unlink()
        assert not _holds_the_named_file(lock, path)
        path.write_text("")  # a new lock file another process made
        assert not _holds_the_named_file(lock, path)
    finally:
        lock.release()


def test_a_folder_the_lock_made_is_removed_when_nothing_was_written_into_it(tmp_path):
    with pytest.raises(ValueError):
        with folder_lock(tmp_path / "a" / "b"):
            raise ValueError("refused after taking the lock")
    assert list(tmp_path.iterdir()) == []
    with folder_lock(tmp_path / "a" / "b") as folder:
        (folder / "result.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "result.txt"]


def test_control_entries_are_recognised():
    assert is_control_entry(LOCK_NAME) and is_control_entry(HOLDER_NAME)
    assert is_control_entry("." + HOLDER_NAME + ".x1y2.tmp")  # write_atomic's temporary file
    assert not is_control_entry("loss.json") and not is_control_entry("domainbed_itl.lock")
