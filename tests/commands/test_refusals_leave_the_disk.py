"""A refused command leaves the disk as it found it: every file's bytes, no lock file, no folder.

Every (folder state, --resume/--overwrite) pair a search command refuses, and a resume whose
flags contradict the checkpoint, compared file by file before and after. No DomainBed needed.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from property_harness import call, check_boundary, snapshot

from domainbed_itl.scripts import cma_search, meta_train

SYNTHETIC = ["--dataset", "synthetic", "--per_domain_cap", "40", "--inner_steps", "6", "--hidden", "8",
             "--hvp_batch", "16", "--no_progress"]
COMMANDS = {"meta_train": (meta_train.main, [*SYNTHETIC, "--outer_steps", "1"]),
            "cma_search": (cma_search.main, [*SYNTHETIC[:-3], "--no_progress", "--generations", "1",
                                             "--popsize", "3"])}
FLAGS = {"none": [], "resume": ["--resume"], "overwrite": ["--overwrite"],
         "both": ["--resume", "--overwrite"]}


def _make(state: str, folder: Path) -> None:
    """The output folder in `state`: missing, an empty folder, or one holding a user's file."""
    if state != "missing":
        folder.mkdir(parents=True)
    if state == "not_empty":
        (folder / "notes.txt").write_text("mine")


def _refused(state: str, flags: str) -> bool:
    """Whether the rules refuse this pair (docs/files.md): --resume needs a run to continue,
    a folder holding files needs --resume or --overwrite, the two flags exclude each other."""
    return flags == "both" or flags == "resume" or (state == "not_empty" and flags == "none")


CASES = [(command, state, flags) for command, state, flags in
         itertools.product(COMMANDS, ("missing", "empty", "not_empty"), FLAGS) if _refused(state, flags)]


@pytest.mark.parametrize("command, state, flags", CASES)
def test_a_refused_command_leaves_the_folder_byte_for_byte(tmp_path, command, state, flags):
    main, base = COMMANDS[command]
    folder = tmp_path / "runs" / "out"
    _make(state, folder)
    before = snapshot(tmp_path, [])
    code, err = call(main, [*base, "--output_dir", folder, *FLAGS[flags]])
    check_boundary(code, err)
    assert code == 2, err
    assert snapshot(tmp_path, []) == before, err  # no lock file, folder or file made or changed
    if flags == "resume" and state != "not_empty":
        assert (f"cannot resume: {folder} holds no checkpoint.pt, so there is no run to resume; "
                "leave out --resume to start one there") in err


@pytest.mark.parametrize("command, contradiction, message", [
    ("meta_train", ["--inner_lr", "0.5"], "--inner_lr 0.5 contradicts the checkpoint's inner_lr"),
    ("cma_search", ["--sigma0", "0.3"], "--sigma0 0.3 contradicts the checkpoint's sigma0"),
])
def test_a_resume_with_contradicting_flags_leaves_the_run_byte_for_byte(tmp_path, command,
                                                                        contradiction, message):
    main, base = COMMANDS[command]
    folder = tmp_path / "out"
    code, err = call(main, [*base, "--output_dir", folder])
    assert code == 0 and (folder / "checkpoint.pt").is_file(), err
    before = snapshot(tmp_path, [])
    code, err = call(main, [*base, "--output_dir", folder, "--resume", *contradiction])
    check_boundary(code, err)
    assert code == 2 and message in err, err
    assert snapshot(tmp_path, []) == before


def test_a_refusal_after_the_lock_leaves_no_lock_file_in_an_existing_empty_folder(tmp_path):
    """A bad value found only once the folder is locked (the data are too small for the batch):
    the lock file that command made goes with it."""
    folder = tmp_path / "out"
    folder.mkdir()
    code, err = call(meta_train.main, [*SYNTHETIC, "--outer_steps", "1", "--per_domain_cap", "4",
                                       "--batch_size", "64", "--output_dir", folder])
    check_boundary(code, err)
    assert code == 2 and "--batch_size 64 is larger than the 20 source examples" in err, err
    assert list(folder.iterdir()) == []
