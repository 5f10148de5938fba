"""DomainBed multi-source sweep accuracies as blocks for the Friedman/Nemenyi comparison.

See docs/single_source.md.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..files.sweepfolder import count_envs
from .friedman_nemenyi import mean_over_trials
from .table_rows import check_subset

Table = Dict[str, Dict[str, float]]


def multi_source_blocks(grouped: Iterable[Mapping], sweep_acc: Callable[[Sequence[Mapping]], Optional[float]],
                        env_names: Callable[[str], Optional[List[str]]], level: str,
                        algorithms: Optional[Sequence[str]], datasets: Optional[Sequence[str]],
                        source: str = "the sweep") -> Tuple[Table, List[str], List[str]]:
    """{block: {algorithm: accuracy averaged over trials}}, the algorithms, and notes.

    `grouped` holds one entry per (dataset, algorithm, test_env, trial_seed) with its `records`;
    `sweep_acc` selects a model and returns its test accuracy (None: not enough records);
    `env_names(dataset)` gives domain names (None: the indices). `level` is 'domain' (a block per
    dataset and test env) or 'dataset' (the mean over test envs, per trial with every test env).
    """
    accs, n_envs = [], {}
    for group in grouped:
        acc = sweep_acc(group["records"])
        if acc is not None:
            n_envs[group["dataset"]] = count_envs(group["records"][0])
            accs.append((group["dataset"], group["algorithm"], group["test_env"],
                         group["trial_seed"], acc))
    if not accs:
        raise ValueError(f"no multi-source (single test env) runs in {source}")
    algorithms = check_subset("algorithm", algorithms, sorted({a[1] for a in accs}))
    datasets = check_subset("dataset", datasets, sorted({a[0] for a in accs}))
    accs = [a for a in accs if a[0] in datasets and a[1] in algorithms]
    names = {d: env_names(d) or [str(e) for e in range(n_envs[d])] for d in datasets}
    notes: List[str] = []
    if level == "domain":
        entries = [(f"{d}:{names[d][e]}", a, t, acc) for d, a, e, t, acc in accs]
    elif level == "dataset":
        per_trial: Dict[Tuple[str, str, int], Dict[int, float]] = {}
        for d, a, e, t, acc in accs:
            per_trial.setdefault((d, a, t), {})[e] = acc
        entries = [(d, a, t, float(np.mean(list(envs.values()))))
                   for (d, a, t), envs in per_trial.items() if len(envs) == n_envs[d]]
        partial = sorted(f"{d} {a} trial {t}" for (d, a, t), envs in per_trial.items()
                         if len(envs) < n_envs[d])
        if partial:
            notes.append(f"multi-source: left out {len(partial)} trials without every test env: "
                         + "; ".join(partial))
    else:
        raise ValueError(f"multi-source blocks are 'domain' or 'dataset', got {level!r}")
    table, counts = mean_over_trials(entries)
    most = max(counts.values(), default=0)
    fewer = sorted(f"{b} {a}: {n}" for (b, a), n in counts.items() if n < most)
    if fewer:
        notes.append(f"multi-source: {len(fewer)} cells average fewer than {most} trials: "
                     + "; ".join(fewer))
    return table, algorithms, notes
