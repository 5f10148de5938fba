"""Single-source domain generalisation results (Gao et al., ICML 2022, Sec. 4.2, Tables 4 and 10).

A single-source run is a DomainBed `train` run whose `test_envs` are every domain but one, the
source. This module reads the runs' `results.jsonl` records (plain dicts, exactly as DomainBed's
train writes them) and aggregates them; it never imports DomainBed, so it works wherever the
result folders are.

Protocol:

* Model selection is DomainBed's training-domain validation applied to the one training domain:
  for every (dataset, algorithm, source, trial) the chosen model is the argmax, over hparams
  seeds and checkpoints, of the source's held-out accuracy `env{source}_out_acc` (ties: the
  earliest checkpoint, then the lowest hparams seed). Its accuracy on target t is
  `env{t}_in_acc`, as DomainBed reports test environments.
* A (dataset, algorithm, source, trial) is used only when every expected hparams seed has a
  finished run (a `done` marker and records); otherwise the trial is left out of that cell and
  the cell says how many trials it holds. What is expected comes from the launcher's manifest
  (`MANIFEST_NAME`) and from the records: for every (dataset, algorithm) present, every source
  domain, and every trial and hparams seed seen for that pair.
* Means are over trials with DomainBed's standard error (`format_mean`: population standard
  deviation over sqrt(number of trials)), in percent.
* Records with more than one training domain (multi-source runs sharing the folder) are counted
  and ignored.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import write_atomic

MANIFEST_NAME = "single_source_sweep.json"
MANIFEST_FORMAT = "domainbed_itl single-source sweep"
FORMATS = ("text", "latex", "markdown")
BLOCK_LEVELS = ("domain", "pair", "dataset")
_ARGS = ("dataset", "algorithm", "test_envs", "trial_seed", "hparams_seed")
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


@dataclass(frozen=True)
class Selection:
    """The model chosen for one (dataset, algorithm, source, trial)."""

    hparams_seed: int
    step: int
    val_acc: float
    target_accs: Dict[int, float]


@dataclass
class Cell:
    """Table 10's cell: one (dataset, algorithm, source), its complete trials' selections."""

    dataset: str
    algorithm: str
    source: int
    targets: Tuple[int, ...]
    expected_trials: Tuple[int, ...]
    selections: Dict[int, Selection] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every expected trial has a selection."""
        return set(self.selections) == set(self.expected_trials)

    def trial_means(self) -> Dict[int, float]:
        """Per trial: the chosen model's mean accuracy over the targets."""
        return {t: float(np.mean([s.target_accs[e] for e in self.targets]))
                for t, s in sorted(self.selections.items())}

    def target_means(self) -> Dict[int, float]:
        """Per target: the accuracy averaged over trials."""
        return {e: float(np.mean([s.target_accs[e] for s in self.selections.values()]))
                for e in self.targets}


@dataclass
class SingleSourceResults:
    """Every cell of the sweep, what is missing, and what was ignored."""

    cells: Dict[Tuple[str, str, int], Cell]
    n_envs: Dict[str, int]
    problems: List[str]
    n_runs: int
    n_complete_runs: int
    ignored_multi_source_runs: int
    ignored_multi_source_records: int
    ignored_other: List[str]

    @property
    def datasets(self) -> List[str]:
        """Datasets present, sorted."""
        return sorted(self.n_envs)

    @property
    def algorithms(self) -> List[str]:
        """Algorithms present, sorted."""
        return sorted({a for _, a, _ in self.cells})

    def dataset_trial_means(self, dataset: str, algorithm: str) -> Tuple[Dict[int, float], int]:
        """Table 4's values: per trial complete for every source, the mean over sources and
        targets; and the number of trials expected."""
        cells = [self.cells[dataset, algorithm, s] for s in range(self.n_envs[dataset])]
        expected = set().union(*(c.expected_trials for c in cells))
        trials = sorted(set.intersection(*(set(c.selections) for c in cells)))
        means = {t: float(np.mean([c.trial_means()[t] for c in cells])) for t in trials}
        return means, len(expected)

    def scores(self, level: str, algorithms: Sequence[str], datasets: Sequence[str],
               env_names: Optional[Mapping[str, Sequence[str]]] = None
               ) -> Dict[str, Dict[str, float]]:
        """Accuracies for significance tests: {block: {algorithm: mean over trials}}.

        `level` is 'domain' (a block per dataset and source domain: the mean over targets),
        'pair' (per source -> target pair) or 'dataset' (Table 4's values). Only cells with
        every expected trial contribute; a block lacks the algorithms whose cell is incomplete.
        """
        if level not in BLOCK_LEVELS:
            raise ValueError(f"unknown block level {level!r}; expected one of {', '.join(BLOCK_LEVELS)}")
        table: Dict[str, Dict[str, float]] = {}
        for dataset in datasets:
            names = _env_names(dataset, self.n_envs[dataset], env_names)
            for algorithm in algorithms:
                if (dataset, algorithm, 0) not in self.cells:
                    continue
                if level == "dataset":
                    means, expected = self.dataset_trial_means(dataset, algorithm)
                    complete = bool(means) and len(means) == expected
                    _put(table, dataset, algorithm, float(np.mean(list(means.values()))) if complete else None)
                    continue
                for source in range(self.n_envs[dataset]):
                    cell = self.cells[dataset, algorithm, source]
                    if level == "domain":
                        block = f"{dataset}:{names[source]}"
                        value = (float(np.mean(list(cell.trial_means().values())))
                                 if cell.complete else None)
                        _put(table, block, algorithm, value)
                        continue
                    target_means = cell.target_means() if cell.complete else {}
                    for target in cell.targets:
                        block = f"{dataset}:{names[source]}->{names[target]}"
                        _put(table, block, algorithm, target_means.get(target))
        return table


def _put(table: Dict[str, Dict[str, float]], block: str, algorithm: str,
         value: Optional[float]) -> None:
    row = table.setdefault(block, {})
    if value is not None:
        row[algorithm] = value


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


def select_checkpoint(records: Sequence[Mapping], source: int) -> Mapping:
    """The checkpoint record with the highest `env{source}_out_acc`; ties: the earliest step."""
    if not records:
        raise ValueError("no records to select a checkpoint from")
    key = f"env{source}_out_acc"
    return max(records, key=lambda r: (r[key], -r["step"]))


def select_model(runs: Mapping[int, Sequence[Mapping]], source: int) -> Selection:
    """Training-domain validation over {hparams_seed: records}: the argmax over hparams seeds
    and checkpoints of the source's validation accuracy (ties: the lowest hparams seed)."""
    if not runs:
        raise ValueError("no runs to select a model from")
    best = {h: select_checkpoint(records, source) for h, records in runs.items()}
    key = f"env{source}_out_acc"
    hparams_seed = max(best, key=lambda h: (best[h][key], -h))
    record = best[hparams_seed]
    targets = [e for e in range(count_envs(record)) if e != source]
    return Selection(hparams_seed, int(record["step"]), float(record[key]),
                     {e: float(record[f"env{e}_in_acc"]) for e in targets})


def mean_and_error(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and standard error in percent, as DomainBed's format_mean computes them."""
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        raise ValueError("no values to average")
    return 100 * float(np.mean(data)), 100 * float(np.std(data) / np.sqrt(data.size))


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


def summarise(runs: Sequence[Run], planned: Sequence[PlannedJob] = ()) -> SingleSourceResults:
    """Select a model per (dataset, algorithm, source, trial) and list what is missing."""
    planned_by_folder = {job.folder: job for job in planned}
    by_key: Dict[RunKey, List[Run]] = {job.key: [] for job in planned}
    n_envs: Dict[str, int] = {job.key.dataset: job.n_envs for job in planned}
    problems: List[str] = []
    ignored_other: List[str] = []
    multi_runs = multi_records = 0
    for run in runs:
        if not run.records:
            job = planned_by_folder.get(run.folder)
            if job is None:
                problems.append(f"folder {run.folder}: no results.jsonl records and not in the sweep "
                                f"manifest, so which run it holds is unknown")
            else:
                by_key.setdefault(job.key, []).append(run)
            continue
        first = run.records[0]
        args = first.get("args")
        if not isinstance(args, Mapping) or not all(k in args for k in _ARGS) or count_envs(first) < 2:
            problems.append(f"folder {run.folder}: its records are not DomainBed train records (they "
                            f"need 'args' with {', '.join(_ARGS)}, and env<i>_out_acc for 2+ domains)")
            continue
        if args.get("task", "domain_generalization") != "domain_generalization":
            ignored_other.append(f"folder {run.folder}: task {args['task']}")
            continue
        n = count_envs(first)
        test_envs = set(args["test_envs"])
        if len(test_envs) < n - 1:
            multi_runs += 1
            multi_records += len(run.records)
            continue
        if len(test_envs) != n - 1 or not test_envs <= set(range(n)):
            ignored_other.append(f"folder {run.folder}: test_envs {sorted(test_envs)} of {n} domains")
            continue
        n_envs.setdefault(args["dataset"], n)
        by_key.setdefault(run_key(run.records[0]), []).append(run)

    grid: Dict[Tuple[str, str], Tuple[set, set]] = {}
    for key in by_key:
        trials, seeds = grid.setdefault((key.dataset, key.algorithm), (set(), set()))
        trials.add(key.trial_seed)
        seeds.add(key.hparams_seed)

    planned_by_key = {job.key: job.folder for job in planned}
    cells: Dict[Tuple[str, str, int], Cell] = {}
    n_complete = 0
    for (dataset, algorithm), (trials, seeds) in sorted(grid.items()):
        n = n_envs[dataset]
        for source in range(n):
            cell = Cell(dataset, algorithm, source, tuple(e for e in range(n) if e != source),
                        tuple(sorted(trials)))
            cells[dataset, algorithm, source] = cell
            for trial in sorted(trials):
                finished: Dict[int, List[dict]] = {}
                for seed in sorted(seeds):
                    key = RunKey(dataset, algorithm, source, trial, seed)
                    problem = _run_problem(by_key.get(key, []), planned_by_key.get(key))
                    if problem:
                        problems.append(f"{key}: {problem}")
                    else:
                        finished[seed] = by_key[key][0].records
                n_complete += len(finished)
                if len(finished) == len(seeds):
                    cell.selections[trial] = select_model(finished, source)
    return SingleSourceResults(cells, n_envs, problems, sum(len(v) for v in by_key.values()),
                               n_complete, multi_runs, multi_records, ignored_other)


def _run_problem(runs: Sequence[Run], planned_folder: Optional[str]) -> Optional[str]:
    if not runs and planned_folder:
        return f"its folder {planned_folder} is missing (not launched yet, or deleted)"
    if not runs:
        return "no job folder"
    if len(runs) > 1:
        return "ambiguous: folders " + ", ".join(r.folder for r in runs) + " hold the same run"
    run = runs[0]
    if run.error:
        return f"folder {run.folder}: {run.error}"
    if not run.done:
        return f"folder {run.folder} has no `done` marker (still running, or failed)"
    if not run.records:
        return f"folder {run.folder} is done but has no results.jsonl records"
    return None


def _env_names(dataset: str, n: int, env_names: Optional[Mapping[str, Sequence[str]]]) -> List[str]:
    names = list(env_names[dataset]) if env_names and dataset in env_names else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{dataset} has {n} domains in the records but {len(names)} names: {names}")
    return names


def _pm(fmt: str) -> str:
    return {"text": "+/-", "latex": "$\\pm$", "markdown": "±"}[fmt]


def _trials_note(n_have: int, n_expected: int) -> str:
    return "" if n_have == n_expected else f" [{n_have}/{n_expected} trials]"


def format_cell(cell: Cell, fmt: str = "text") -> str:
    """Table 10's cell: target accuracies '/'-separated, then their mean +/- SE over trials."""
    note = _trials_note(len(cell.selections), len(cell.expected_trials))
    if not cell.selections:
        return "X" + note
    targets = "/".join(f"{100 * v:.1f}" for v in cell.target_means().values())
    mean, err = mean_and_error(cell.trial_means().values())
    return f"{targets} {mean:.1f} {_pm(fmt)} {err:.1f}{note}"


def _escape(text: str, fmt: str) -> str:
    if fmt == "latex":
        return re.sub(r"([_%&#$])", r"\\\1", text)
    if fmt == "markdown":
        return text.replace("|", "\\|")
    return text


def render_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], fmt: str) -> str:
    """A table in plain text (DomainBed's collect_results layout), LaTeX or Markdown."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "text":
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = ["", f"-------- {title}"]
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        return "\n".join(lines)
    if fmt == "markdown":
        lines = ["", f"#### {_escape(title, fmt)}", "",
                 "| " + " | ".join(_escape(h, fmt) for h in header) + " |",
                 "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(_escape(v, fmt) for v in r) + " |" for r in rows]
        return "\n".join(lines)
    lines = ["", f"\\subsubsection{{{_escape(title, fmt)}}}", "", "\\begin{center}",
             "\\adjustbox{max width=\\textwidth}{%", "\\begin{tabular}{l" + "c" * (len(header) - 1) + "}",
             "\\toprule", " & ".join(f"\\textbf{{{_escape(h, fmt)}}}" for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join([_escape(r[0], fmt), *r[1:]]) + " \\\\" for r in rows]
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{center}"]
    return "\n".join(lines)


def check_subset(kind: str, wanted: Optional[Sequence[str]], present: Sequence[str]) -> List[str]:
    """`wanted` (all of `present` when None), refusing names absent from `present`."""
    if wanted is None:
        return list(present)
    unknown = [w for w in wanted if w not in present]
    if unknown:
        raise ValueError(f"{kind} {', '.join(map(repr, unknown))} not in the results; they hold "
                         f"{', '.join(present) or 'none'}")
    return list(wanted)


def render_report(results: SingleSourceResults, fmt: str = "text",
                  algorithms: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
                  env_names: Optional[Mapping[str, Sequence[str]]] = None, source: str = "") -> str:
    """Tables 10 and 4, the protocol, what was ignored, and every missing or incomplete run.

    `algorithms` and `datasets` choose and order the rows and columns (default: all, sorted);
    `env_names` maps a dataset to its domain names (default: the domain indices).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    algorithms = check_subset("algorithm", algorithms, results.algorithms)
    datasets = check_subset("dataset", datasets, results.datasets)
    comment = {"text": "", "latex": "% ", "markdown": ""}[fmt]
    pm = _pm(fmt)
    out = [f"{comment}Single-source domain generalisation (Gao et al. 2022, Sec. 4.2)"
           + (f": {source}" if source else ""),
           f"{comment}Model selection: source-domain validation (argmax over hparams seeds and "
           f"checkpoints of env<source>_out_acc); target accuracy: env<target>_in_acc.",
           f"{comment}Cells: mean {pm} standard error over trials, in %.",
           f"{comment}Single-source runs: {results.n_runs} ({results.n_complete_runs} complete); "
           f"ignored multi-source runs: {results.ignored_multi_source_runs} "
           f"({results.ignored_multi_source_records} records)."]
    for line in results.ignored_other:
        out.append(f"{comment}Ignored {line}.")
    if results.problems:
        out.append(f"{comment}WARNING: {len(results.problems)} missing or incomplete runs, listed at "
                   f"the end; their trials are left out and the cells say so.")
    for dataset in datasets:
        names = _env_names(dataset, results.n_envs[dataset], env_names)
        rows_algorithms = [a for a in algorithms if (dataset, a, 0) in results.cells]
        header = ["Algorithm"] + [f"{names[s]} -> " + "/".join(names[t] for t in range(len(names)) if t != s)
                                  for s in range(len(names))] + ["Avg"]
        rows = []
        for algorithm in rows_algorithms:
            row = [algorithm] + [format_cell(results.cells[dataset, algorithm, s], fmt)
                                 for s in range(len(names))]
            row.append(_format_dataset_mean(results, dataset, algorithm, fmt))
            rows.append(row)
        out.append(render_table(f"Table 10, dataset: {dataset} (column: source -> targets; cell: "
                                f"target accuracies, then their mean and its SE)", header, rows, fmt))
    header = ["Algorithm", *datasets, "Avg"]
    rows = []
    for algorithm in algorithms:
        row, means = [algorithm], []
        for dataset in datasets:
            if (dataset, algorithm, 0) not in results.cells:
                row.append("X [no runs]")
                means.append(None)
                continue
            row.append(_format_dataset_mean(results, dataset, algorithm, fmt))
            trial_means, expected = results.dataset_trial_means(dataset, algorithm)
            means.append(mean_and_error(trial_means.values())[0]
                         if trial_means and len(trial_means) == expected else None)
        row.append("X" if None in means else f"{np.mean(means):.1f}")
        rows.append(row)
    out.append(render_table("Table 4: mean over source domains and their targets", header, rows, fmt))
    if results.problems:
        out.append("")
        out.append(f"{comment}Missing or incomplete runs ({len(results.problems)}):")
        out += [f"{comment}  {p}" for p in results.problems]
    return "\n".join(out) + "\n"


def _format_dataset_mean(results: SingleSourceResults, dataset: str, algorithm: str, fmt: str) -> str:
    trial_means, expected = results.dataset_trial_means(dataset, algorithm)
    note = _trials_note(len(trial_means), expected)
    if not trial_means:
        return "X" + note
    mean, err = mean_and_error(trial_means.values())
    return f"{mean:.1f} {_pm(fmt)} {err:.1f}{note}"


__all__ = ["MANIFEST_NAME", "RunKey", "PlannedJob", "Run", "Selection", "Cell", "SingleSourceResults",
           "count_envs", "source_of", "run_key", "select_checkpoint", "select_model", "mean_and_error",
           "read_manifest", "update_manifest", "is_job_folder", "load_runs", "summarise", "format_cell",
           "render_table", "render_report"]
