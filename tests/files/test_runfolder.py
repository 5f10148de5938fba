"""The run-folder library on its own, with a toy kind of run: what a new search method gets by
using it (the lock, the resume and overwrite rules, checkpoints and provenance)."""

from __future__ import annotations

import json

import pytest
import torch

from domainbed_itl.files.runfolder import (REPLACED, RunDirError, RunKind, load_checkpoint,
                                           open_run_folder, read_metrics, resume_hint)
from domainbed_itl.files.runlock import FolderLocked

COUNTING = RunKind("counting", "test-counting-checkpoint", "counts")


def count(folder_path, target, resume=False, overwrite=False, fail_at=None, command="count"):
    """A toy search: counts to `target`, one checkpoint per count; raises at `fail_at`."""
    with open_run_folder(folder_path, COUNTING, resume=resume, overwrite=overwrite,
                         command=command, log=lambda message: None) as folder:
        records = list(folder.checkpoint["metrics"]) if folder.checkpoint else []
        folder.begin(target, "cpu", {"command": command})
        while len(records) < target:
            if len(records) + 1 == fail_at:
                raise FloatingPointError(f"count {fail_at} is not finite")
            records.append({"step": len(records) + 1, "inner_source_acc": 0.0,
                            "outer_heldout_acc": 0.0, "outer_heldout_loss": 1.0 / (len(records) + 1)})
            folder.save_checkpoint({"metrics": records, "state": torch.tensor([len(records)])},
                                   len(records), records)
    return records


def test_a_run_resumes_from_its_folder_and_keeps_its_provenance(tmp_path):
    count(tmp_path, 2, command="first")
    assert resume_hint(tmp_path) == f"the run in {tmp_path} can be resumed with resume=True"
    assert resume_hint(tmp_path, lambda o: f"--{o}").endswith("can be resumed with --resume")
    with pytest.raises(RunDirError, match="is not empty") as refused:
        count(tmp_path, 3)
    assert refused.value.remedy == ("resume", "overwrite") and refused.value.path == tmp_path
    count(tmp_path, 3, resume=True, command="second")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt", COUNTING)
    assert (ckpt["done"], ckpt["unit"], ckpt["device"], ckpt["version"]) == (3, "counts", "cpu", 2)
    assert ckpt["provenance"]["command"] == "first"
    assert [(r["command"], r["from_step"]) for r in ckpt["provenance"]["resumed"]] == [("second", 2)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(RunDirError, match="to 2 counts: the run has done 3 already"):
        count(tmp_path, 2, resume=True)
    with pytest.raises(RunDirError, match="is not a domainbed-itl meta-training checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt",
                        RunKind("meta-training", "domainbed-itl-meta-checkpoint", "outer steps"))


def test_an_overwrite_that_fails_first_brings_the_previous_run_back(tmp_path):
    count(tmp_path, 2)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FloatingPointError, match=r"; the overwrite kept the previous run \(2 counts, "
                                                 r"checkpoint.pt, metrics.jsonl\)"):
        count(tmp_path, 2, overwrite=True, fail_at=1)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before and not (tmp_path / REPLACED).exists()
    count(tmp_path, 1, overwrite=True)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1


def test_one_writer_and_one_opening_per_folder(tmp_path, locked_folder):
    with pytest.raises(FolderLocked, match=str(locked_folder)):
        count(locked_folder, 1)
    with open_run_folder(tmp_path / "run", COUNTING):  # the lock is taken once, even in process
        with pytest.raises(FolderLocked):
            count(tmp_path / "run", 1)
