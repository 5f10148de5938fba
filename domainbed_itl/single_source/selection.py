"""Single-source model selection and aggregation (Gao et al., ICML 2022, Sec. 4.2, Tables 4 and 10).

See docs/single_source.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..analysis.aggregate import mean_se
from ..files.sweepfolder import RECORD_ARGS, JobFolder, PlannedJob, RunKey, count_envs, run_key

BLOCK_LEVELS = ("domain", "pair", "dataset")


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
    damaged: List[str] = field(default_factory=list)  # skipped records and manifest entries

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
            names = env_names_of(dataset, self.n_envs[dataset], env_names)
            for algorithm in algorithms:
                if (dataset, algorithm, 0) not in self.cells:
                    continue
                if level == "dataset":
                    means, expected = self.dataset_trial_means(dataset, algorithm)
                    complete = bool(means) and len(means) == expected
                    _put(table, dataset, algorithm,
                         float(np.mean(list(means.values()))) if complete else None)
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
    """Mean and standard error in percent, as DomainBed's format_mean computes them (the
    population standard deviation over √n: analysis.aggregate.mean_se with ddof=0)."""
    s = mean_se(list(values), ddof=0, finite_only=False)
    if s["n"] == 0:
        raise ValueError("no values to average")
    return 100 * s["mean"], 100 * s["se"]


@dataclass
class _Grouped:
    """The job folders of a sweep by run, and what was set aside on the way."""

    by_key: Dict[RunKey, List[JobFolder]]
    n_envs: Dict[str, int]
    problems: List[str] = field(default_factory=list)
    ignored_other: List[str] = field(default_factory=list)
    multi_runs: int = 0
    multi_records: int = 0


def summarise(runs: Sequence[JobFolder], planned: Sequence[PlannedJob] = (),
              damaged: Sequence[str] = ()) -> SingleSourceResults:
    """Select a model per (dataset, algorithm, source, trial) and list what is missing.

    `damaged`: the manifest's unreadable parts (runs.read_manifest); the runs' skipped lines
    join them in the result's `damaged`.
    """
    grouped = _group(runs, planned)
    cells, n_complete = _select(grouped, planned)
    return SingleSourceResults(cells, grouped.n_envs, grouped.problems,
                               sum(len(v) for v in grouped.by_key.values()), n_complete,
                               grouped.multi_runs, grouped.multi_records, grouped.ignored_other,
                               [*damaged, *(line for run in runs for line in run.skipped)])


def _group(runs: Sequence[JobFolder], planned: Sequence[PlannedJob]) -> _Grouped:
    """The single-source runs by key (with the planned jobs' folders); multi-source runs are
    counted, other records set aside with the reason."""
    planned_by_folder = {job.folder: job for job in planned}
    grouped = _Grouped({job.key: [] for job in planned},
                       {job.key.dataset: job.n_envs for job in planned})
    for run in runs:
        if not run.records:
            job = planned_by_folder.get(run.folder)
            if job is None:
                grouped.problems.append(f"folder {run.folder}: no results.jsonl records and not in "
                                        f"the sweep manifest, so which run it holds is unknown")
            else:
                grouped.by_key.setdefault(job.key, []).append(run)
            continue
        first = run.records[0]
        args = first.get("args")
        if not isinstance(args, Mapping) or not all(k in args for k in RECORD_ARGS) or count_envs(first) < 2:
            grouped.problems.append(f"folder {run.folder}: its records are not DomainBed train records "
                                    f"(they need 'args' with {', '.join(RECORD_ARGS)}, and "
                                    f"env<i>_out_acc for 2+ domains)")
            continue
        if args.get("task", "domain_generalization") != "domain_generalization":
            grouped.ignored_other.append(f"folder {run.folder}: task {args['task']}")
            continue
        n, test_envs = count_envs(first), set(args["test_envs"])
        if len(test_envs) < n - 1:
            grouped.multi_runs += 1
            grouped.multi_records += len(run.records)
            continue
        if len(test_envs) != n - 1 or not test_envs <= set(range(n)):
            grouped.ignored_other.append(f"folder {run.folder}: test_envs {sorted(test_envs)} of {n} domains")
            continue
        grouped.n_envs.setdefault(args["dataset"], n)
        grouped.by_key.setdefault(run_key(run.records[0]), []).append(run)
    return grouped


def _select(grouped: _Grouped, planned: Sequence[PlannedJob]) -> Tuple[Dict[Tuple[str, str, int], Cell], int]:
    """Every cell of the (dataset, algorithm) pairs present, with a selection for each trial
    whose every hparams seed finished; and the number of finished runs."""
    grid: Dict[Tuple[str, str], Tuple[set, set]] = {}
    for key in grouped.by_key:
        trials, seeds = grid.setdefault((key.dataset, key.algorithm), (set(), set()))
        trials.add(key.trial_seed)
        seeds.add(key.hparams_seed)
    planned_by_key = {job.key: job.folder for job in planned}
    cells: Dict[Tuple[str, str, int], Cell] = {}
    n_complete = 0
    for (dataset, algorithm), (trials, seeds) in sorted(grid.items()):
        n = grouped.n_envs[dataset]
        for source in range(n):
            cell = Cell(dataset, algorithm, source, tuple(e for e in range(n) if e != source),
                        tuple(sorted(trials)))
            cells[dataset, algorithm, source] = cell
            for trial in sorted(trials):
                finished: Dict[int, List[dict]] = {}
                for seed in sorted(seeds):
                    key = RunKey(dataset, algorithm, source, trial, seed)
                    problem = _run_problem(grouped.by_key.get(key, []), planned_by_key.get(key))
                    if problem:
                        grouped.problems.append(f"{key}: {problem}")
                    else:
                        finished[seed] = grouped.by_key[key][0].records
                n_complete += len(finished)
                if len(finished) == len(seeds):
                    cell.selections[trial] = select_model(finished, source)
    return cells, n_complete


def _run_problem(runs: Sequence[JobFolder], planned_folder: Optional[str]) -> Optional[str]:
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


def env_names_of(dataset: str, n: int, env_names: Optional[Mapping[str, Sequence[str]]]) -> List[str]:
    """The domain names of `dataset` (`env_names[dataset]`, else the indices), checked against n."""
    names = list(env_names[dataset]) if env_names and dataset in env_names else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{dataset} has {n} domains in the records but {len(names)} names: {names}")
    return names
