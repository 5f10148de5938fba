"""Tables 4 and 10 of Gao et al. (ICML 2022) as text, LaTeX or Markdown, from `selection.summarise`.

Nothing here imports DomainBed: `domainbed_labels` is handed DomainBed's modules by the caller.

See docs/single_source.md.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..analysis.table_rows import check_subset
from .selection import Cell, SingleSourceResults, env_names_of, mean_and_error

FORMATS = ("text", "latex", "markdown")


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
    out = _preamble(results, fmt, comment, source)
    out += [_table10(results, dataset, algorithms, env_names, fmt) for dataset in datasets]
    out.append(_table4(results, datasets, algorithms, fmt))
    for what, lines in (("Missing or incomplete runs", results.problems),
                        ("Skipped damaged records", results.damaged)):
        if lines:
            out += ["", f"{comment}{what} ({len(lines)}):", *(f"{comment}  {line}" for line in lines)]
    return "\n".join(out) + "\n"


def _preamble(results: SingleSourceResults, fmt: str, comment: str, source: str) -> List[str]:
    """The report's opening lines: the protocol, the runs counted and ignored, the warnings."""
    pm = _pm(fmt)
    out = [f"{comment}Single-source domain generalisation (Gao et al. 2022, Sec. 4.2)"
           + (f": {source}" if source else ""),
           f"{comment}Model selection: source-domain validation (argmax over hparams seeds and "
           f"checkpoints of env<source>_out_acc); target accuracy: env<target>_in_acc.",
           f"{comment}Cells: mean {pm} standard error over trials, in %.",
           f"{comment}Single-source runs: {results.n_runs} ({results.n_complete_runs} complete); "
           f"ignored multi-source runs: {results.ignored_multi_source_runs} "
           f"({results.ignored_multi_source_records} records)."]
    out += [f"{comment}Ignored {line}." for line in results.ignored_other]
    if results.problems:
        out.append(f"{comment}WARNING: {len(results.problems)} missing or incomplete runs, listed at "
                   f"the end; their trials are left out and the cells say so.")
    if results.damaged:
        out.append(f"{comment}WARNING: {len(results.damaged)} damaged records or manifest entries "
                   f"could not be read and were skipped, listed at the end.")
    return out


def _table10(results: SingleSourceResults, dataset: str, algorithms: Sequence[str],
             env_names: Optional[Mapping[str, Sequence[str]]], fmt: str) -> str:
    """Table 10 for one dataset: a column per source domain, and the average."""
    names = env_names_of(dataset, results.n_envs[dataset], env_names)
    header = ["Algorithm"] + [f"{names[s]} -> " + "/".join(names[t] for t in range(len(names)) if t != s)
                              for s in range(len(names))] + ["Avg"]
    rows = []
    for algorithm in [a for a in algorithms if (dataset, a, 0) in results.cells]:
        row = [algorithm] + [format_cell(results.cells[dataset, algorithm, s], fmt)
                             for s in range(len(names))]
        row.append(_format_dataset_mean(results, dataset, algorithm, fmt))
        rows.append(row)
    return render_table(f"Table 10, dataset: {dataset} (column: source -> targets; cell: "
                        f"target accuracies, then their mean and its SE)", header, rows, fmt)


def _table4(results: SingleSourceResults, datasets: Sequence[str], algorithms: Sequence[str],
            fmt: str) -> str:
    """Table 4: a column per dataset (the mean over its sources and targets), and the average."""
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
    return render_table("Table 4: mean over source domains and their targets", header, rows, fmt)


def _format_dataset_mean(results: SingleSourceResults, dataset: str, algorithm: str, fmt: str) -> str:
    trial_means, expected = results.dataset_trial_means(dataset, algorithm)
    note = _trials_note(len(trial_means), expected)
    if not trial_means:
        return "X" + note
    mean, err = mean_and_error(trial_means.values())
    return f"{mean:.1f} {_pm(fmt)} {err:.1f}{note}"


def domainbed_labels(results: SingleSourceResults, datasets: ModuleType, algorithms: ModuleType
                     ) -> Tuple[Dict[str, List[str]], List[str], List[str]]:
    """Domain names, algorithm order and dataset order of `results`, from DomainBed's
    `datasets` and `algorithms` modules; names DomainBed does not know keep their place last."""
    names = {d: list(datasets.get_dataset_class(d).ENVIRONMENTS) for d in results.datasets
             if d in datasets.DATASETS}
    algorithm_order = ([a for a in algorithms.ALGORITHMS if a in results.algorithms] +
                       [a for a in results.algorithms if a not in algorithms.ALGORITHMS])
    dataset_order = ([d for d in datasets.DATASETS if d in results.datasets] +
                     [d for d in results.datasets if d not in datasets.DATASETS])
    return names, algorithm_order, dataset_order
