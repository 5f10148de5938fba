"""Single-source sweep folders: DomainBed's job folders, their records, and the sweep manifest.

A single-source run is a DomainBed `train` run whose `test_envs` are every domain but one, the
source. Its folder holds `results.jsonl` (plain dicts, exactly as DomainBed's train writes them)
and, once finished, `done`. The launcher (`domainbed_itl.scripts.single_source_sweep`) also keeps
a manifest of the planned jobs (`MANIFEST_NAME`), so that the report can name runs whose folders
are missing or empty. Nothing here imports DomainBed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Union

from ..atomic import write_atomic

MANIFEST_NAME = "single_source_sweep.json"
MANIFEST_FORMAT = "domainbed_itl single-source sweep"
RECORD_ARGS = ("dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed")
_JOB_HASH = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, order=True)
class RunKey:
    """Which single-source run a job folder holds."""

    dataset: str
    algorithm: str
    source: int
    trial_seed: int
    hparams_seed: int

    def __str__(self) -> str:
        return (f"{self.dataset}/{self.algorithm} source {self.source} trial {self.trial_seed} "
                f"hparams_seed {self.hparams_seed}")


@dataclass(frozen=True)
class PlannedJob:
    """A job of the launcher's manifest: its folder (DomainBed's args hash) and its run."""

    folder: str
    key: RunKey
    n_envs: int

    def to_json(self) -> dict:
        """The manifest entry."""
        return {"folder": self.folder, "n_envs": self.n_envs, **vars(self.key)}

    @classmethod
    def from_json(cls, entry: Mapping) -> "PlannedJob":
        """Parse a manifest entry."""
        key = RunKey(str(entry["dataset"]), str(entry["algorithm"]), int(entry["source"]),
                     int(entry["trial_seed"]), int(entry["hparams_seed"]))
        return cls(str(entry["folder"]), key, int(entry["n_envs"]))


@dataclass
class Run:
    """One job folder: its records, whether DomainBed's `done` marker exists, read errors."""

    folder: str
    records: List[dict]
    done: bool
    error: Optional[str] = None


def count_envs(record: Mapping) -> int:
    """The number of domains in a DomainBed record: its consecutive env{i}_out_acc keys."""
    n = 0
    while f"env{n}_out_acc" in record:
        n += 1
    return n


def source_of(record: Mapping) -> Optional[int]:
    """The source domain of a single-source record; None for a record with several sources."""
    n = count_envs(record)
    test_envs = set(record["args"]["test_envs"])
    if len(test_envs) != n - 1 or not test_envs <= set(range(n)):
        return None
    (source,) = set(range(n)) - test_envs
    return source


def run_key(record: Mapping) -> RunKey:
    """The RunKey of a single-source record (see `source_of`)."""
    source = source_of(record)
    if source is None:
        raise ValueError(f"record with test_envs {record['args']['test_envs']} is not single-source")
    args = record["args"]
    return RunKey(args["dataset"], args["algorithm"], source, int(args["trial_seed"]),
                  int(args["hparams_seed"]))


def read_manifest(sweep_dir: Union[str, os.PathLike]) -> List[PlannedJob]:
    """The jobs listed in the sweep's manifest; [] without one."""
    path = Path(sweep_dir) / MANIFEST_NAME
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a {MANIFEST_FORMAT} manifest")
    return [PlannedJob.from_json(entry) for entry in data["jobs"]]


def update_manifest(sweep_dir: Union[str, os.PathLike], jobs: Iterable[PlannedJob]) -> Path:
    """Add `jobs` to the sweep's manifest (atomically), keeping the jobs already listed."""
    merged = {job.folder: job for job in read_manifest(sweep_dir)}
    merged.update({job.folder: job for job in jobs})
    data = {"format": MANIFEST_FORMAT, "version": 1,
            "jobs": [merged[f].to_json() for f in sorted(merged)]}
    return write_atomic(Path(sweep_dir) / MANIFEST_NAME, json.dumps(data, indent=1) + "\n",
                        overwrite=True)


def is_job_folder(folder: Path) -> bool:
    """A DomainBed job folder: named by Job's md5 args hash, or holding results or `done`.

    Other folders of a sweep (the submitit launcher's `submitit` logs, say) are not jobs.
    """
    return (folder.is_dir() and (_JOB_HASH.fullmatch(folder.name) is not None or
                                 (folder / "results.jsonl").exists() or (folder / "done").exists()))


def load_runs(sweep_dir: Union[str, os.PathLike]) -> List[Run]:
    """Every job folder under `sweep_dir` (see `is_job_folder`) with its records and `done` state.

    A half-written last line (a job writing while we read) is skipped; any other line that is
    not JSON marks the run as unreadable.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"--input_dir {sweep_dir} is not a folder")
    runs = []
    for folder in sorted(p for p in sweep_dir.iterdir() if is_job_folder(p)):
        done = (folder / "done").exists()
        records: List[dict] = []
        error = None
        results = folder / "results.jsonl"
        if results.exists():
            lines = results.read_text().splitlines()
            for i, line in enumerate(lines):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if i == len(lines) - 1 and not done:
                        continue
                    error = f"line {i + 1} of results.jsonl is not JSON"
                    break
        runs.append(Run(folder.name, records, done, error))
    return runs
