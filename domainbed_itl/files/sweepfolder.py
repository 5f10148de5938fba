"""Single-source sweep folders: DomainBed's job folders, their records, and the sweep manifest.

See docs/single_source.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .atomic import write_atomic
from .errors import Worded, option
from .reading import UnreadableFile, read_text
from .schemas import (MANIFEST_FORMAT, MANIFEST_VERSIONS, DomainBedRecord, Manifest, ManifestJob,
                      SchemaError, check, check_version)

MANIFEST_NAME = "single_source_sweep.json"
RECORD_ARGS = ("dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed")
_JOB_HASH = re.compile(r"[0-9a-f]{32}")


class NotAFolder(Worded, FileNotFoundError):
    """A sweep folder that is not a folder; `path` is it."""


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
    def from_json(cls, entry: Any, where: str = "manifest entry") -> "PlannedJob":
        """Parse a manifest entry (checked as domainbed_itl.files.schemas.ManifestJob);
        SchemaError naming `where` and the field."""
        job = check(ManifestJob, entry, where)
        key = RunKey(job.dataset, job.algorithm, job.source, job.trial_seed, job.hparams_seed)
        return cls(job.folder, key, job.n_envs)


@dataclass
class JobFolder:
    """One job folder: its records, whether DomainBed's `done` marker exists, why its results
    could not be read (`error`), and the damaged lines skipped (`skipped`, 'file:line: why')."""

    folder: str
    records: List[dict]
    done: bool
    error: Optional[str] = None
    skipped: List[str] = field(default_factory=list)


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


def record_problem(record: Any) -> Optional[str]:
    """Why `record` is not a DomainBed train record the reports can read; None if it is one.

    A record is a JSON object following domainbed_itl.files.schemas.DomainBedRecord: an integer
    `step`, `args` holding RECORD_ARGS (`test_envs` a list of domain indices), and accuracies in
    [0, 1] env<i>_in_acc and env<i>_out_acc for 2 or more domains.
    """
    if not isinstance(record, dict):
        return f"not a JSON object but {json.dumps(record)[:60]}"
    try:
        check(DomainBedRecord, record, "record")
    except SchemaError as error:
        return str(error).removeprefix("record: ")
    return None


def read_manifest(sweep_dir: Union[str, os.PathLike],
                  damaged: Optional[List[str]] = None) -> List[PlannedJob]:
    """The jobs listed in the sweep's manifest; [] without one.

    A manifest that cannot be read, or one of its entries, raises ValueError naming the file and
    the line or entry; with a `damaged` list, it is described there instead and skipped.
    """
    path = Path(sweep_dir) / MANIFEST_NAME
    if not path.exists():
        return []

    def problem(text: str) -> None:
        if damaged is None:
            raise ValueError(f"{text}; move it aside (a launch writes the jobs it plans again)")
        damaged.append(text)

    try:
        data = json.loads(read_text(path, what="sweep manifest"))
    except json.JSONDecodeError as error:
        problem(f"{path}:{error.lineno}: the sweep manifest is not valid JSON ({error.msg}, column "
                f"{error.colno}); skipped")
        return []
    except (OSError, UnreadableFile) as error:
        problem(f"{path}: the sweep manifest cannot be read ({error}); skipped")
        return []
    try:
        check_version(data, MANIFEST_VERSIONS, f"{path}")
        manifest = check(Manifest, data, f"{path}")
    except SchemaError as error:
        problem(f"{error}: not a {MANIFEST_FORMAT} manifest this version reads; skipped")
        return []
    jobs = []
    for i, entry in enumerate(manifest.jobs):
        try:
            jobs.append(PlannedJob.from_json(entry, f"job entry {i + 1} of {len(manifest.jobs)}"))
        except SchemaError as error:
            problem(f"{path}: {error}; skipped")
    return jobs


def update_manifest(sweep_dir: Union[str, os.PathLike], jobs: Iterable[PlannedJob]) -> Path:
    """Add `jobs` to the sweep's manifest (atomically), keeping the jobs already listed; a
    damaged manifest raises ValueError (see read_manifest) rather than lose its entries."""
    merged = {job.folder: job for job in read_manifest(sweep_dir)}
    merged.update({job.folder: job for job in jobs})
    data = {"format": MANIFEST_FORMAT, "version": max(MANIFEST_VERSIONS),
            "jobs": [merged[f].to_json() for f in sorted(merged)]}
    return write_atomic(Path(sweep_dir) / MANIFEST_NAME, json.dumps(data, indent=1) + "\n",
                        overwrite=True)


def is_job_folder(folder: Path) -> bool:
    """A DomainBed job folder: named by Job's md5 args hash, or holding results or `done`.

    Other folders of a sweep (the submitit launcher's `submitit` logs, say) are not jobs.
    """
    return (folder.is_dir() and (_JOB_HASH.fullmatch(folder.name) is not None or
                                 (folder / "results.jsonl").exists() or (folder / "done").exists()))


def remove_never_started(output_dir: Union[str, os.PathLike]) -> int:
    """Remove the empty job folders that DomainBed made for jobs it never started, so that its
    launch runs them; how many. (DomainBed's `Job.launch` makes every job's folder before the
    first job runs, and launches only jobs without a folder: after an interruption, the empty
    folder of a job that never started would block it.)"""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return 0
    empty = [p for p in output_dir.iterdir() if is_job_folder(p) and not any(p.iterdir())]
    for folder in empty:
        folder.rmdir()
    return len(empty)


def last_error_line(folder: Union[str, os.PathLike]) -> Optional[str]:
    """The last non-empty line of a DomainBed job's `err.txt` (its exception, for a crashed job)."""
    try:
        lines = (Path(folder) / "err.txt").read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in reversed(lines) if line.strip()), None)


def unfinished_jobs(sweep_dir: Union[str, os.PathLike]) -> List[str]:
    """The job folders under `sweep_dir` without DomainBed's `done` marker, each with the last
    line of its err.txt (for a crashed job, its exception)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    return [f"{folder}: {last_error_line(folder) or 'no err.txt'}"
            for folder in sorted(sweep_dir.iterdir())
            if is_job_folder(folder) and not (folder / "done").exists()]


def load_runs(sweep_dir: Union[str, os.PathLike]) -> List[JobFolder]:
    """Every job folder under `sweep_dir` (see `is_job_folder`) with its records and `done` state.

    A half-written last line of an unfinished run (a job writing while we read) is left out
    quietly; any other line that is not JSON, or not a record the reports can read
    (`record_problem`), is skipped and described in the run's `skipped`. A results.jsonl that
    cannot be read at all sets the run's `error`.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise NotAFolder(f"{option('sweep_dir', 'the sweep folder')} {sweep_dir} is not a folder",
                         path=sweep_dir)
    runs = []
    for folder in sorted(p for p in sweep_dir.iterdir() if is_job_folder(p)):
        run = JobFolder(folder.name, [], (folder / "done").exists())
        results = folder / "results.jsonl"
        try:
            lines = read_text(results, what="results file").splitlines() if results.exists() else []
        except (OSError, UnreadableFile) as error:
            run.error, lines = f"cannot read results.jsonl ({error})", []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1 and not run.done:
                    continue
                run.skipped.append(f"{results}:{i + 1}: not JSON")
                continue
            problem = record_problem(record)
            if problem:
                run.skipped.append(f"{results}:{i + 1}: {problem}")
            else:
                run.records.append(record)
        mixed = mixed_runs(run.records)
        if mixed:  # a second run appended to the file: neither is the job's run alone
            run.error = (f"{results} holds the records of more than one run ({mixed}); set aside, "
                         "as they are not one run's: move it away and run the job again")
            run.records = []
        runs.append(run)
    return runs


def mixed_runs(records: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """Why `records` (one job's results.jsonl, in file order) are not one run's, or None: every
    record of a run has the first's args (seeds, steps, output folder, ...) and hparams, and
    its steps increase (DomainBed's train appends; a run started again starts at step 0)."""
    if not records:
        return None
    first = records[0]
    for number, record in enumerate(records[1:], start=2):
        for key in ("args", "hparams"):
            if record.get(key) != first.get(key):
                a, b = (r.get(key) if isinstance(r.get(key), dict) else {} for r in (first, record))
                keys = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
                return f"record {number} has other {key} than record 1: {', '.join(keys[:5])}"
        if record.get("step", 0) <= records[number - 2].get("step", 0):
            return (f"record {number} is step {record.get('step')} after step "
                    f"{records[number - 2].get('step')}")
    return None


def records_of(runs: Iterable[JobFolder]) -> Tuple[List[dict], List[str]]:
    """Every readable record of `runs`, and what was skipped (damaged lines, unreadable files)."""
    records: List[dict] = []
    damaged: List[str] = []
    for run in runs:
        records += run.records
        damaged += run.skipped + ([f"{run.folder}: {run.error}"] if run.error else [])
    return records, damaged
