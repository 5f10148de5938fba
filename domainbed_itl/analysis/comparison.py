"""Paired comparison of losses: the statistics and tables behind `scripts/evaluate_loss`.

See docs/loss_search.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from .aggregate import mean_se


@dataclass(frozen=True)
class Summary:
    """A metric of one loss over the pairing units."""

    mean: float
    se: float
    minimum: float
    maximum: float
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """loss − reference, unit by unit."""

    mean: float
    se: float
    wins: int
    ties: int
    n: int
    t_pvalue: float
    wilcoxon_pvalue: float


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± SE (sample standard deviation / √n; nan for n = 1) and the range of `values`."""
    if len(values) == 0:
        raise ValueError("cannot summarize an empty list of values")
    s = mean_se(values, ddof=1, finite_only=False)
    return Summary(s["mean"], s["se"], s["min"], s["max"], s["n"])


def paired_difference(values: Sequence[float], reference: Sequence[float],
                      higher_is_better: bool = True) -> PairedDifference:
    """The paired differences values − reference with a t-test and a Wilcoxon signed-rank test.

    A unit is a win where the difference is positive, or negative if not `higher_is_better`.
    The p-values are two-sided; nan where the test is undefined (fewer than 2 pairs, or every
    difference zero).
    """
    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values need two equally long non-empty lists, got {a.size} and {b.size}")
    d = a - b
    summary = summarize(d)
    t_p = w_p = math.nan
    if d.size > 1 and np.any(d != 0):
        t_p = float(stats.ttest_rel(a, b).pvalue)
        w_p = float(stats.wilcoxon(a, b).pvalue)
    wins = int((d > 0).sum() if higher_is_better else (d < 0).sum())
    return PairedDifference(summary.mean, summary.se, wins, int((d == 0).sum()),
                            int(d.size), t_p, w_p)


def unit_means(records: Sequence[Mapping[str, Any]], metric: str,
               group: Sequence[str] = ()) -> Dict[tuple, Dict[Any, float]]:
    """{(loss, *group values): {unit: mean of `metric` over the domains}}."""
    cells: Dict[tuple, Dict[Any, List[float]]] = {}
    for r in records:
        key = (r["loss"], *(r[g] for g in group))
        cells.setdefault(key, {}).setdefault(r["unit"], []).append(float(r[metric]))
    return {k: {u: float(np.mean(v)) for u, v in units.items()} for k, units in cells.items()}


def compare(records: Sequence[Mapping[str, Any]], metric: str, reference: str,
            group: Sequence[str] = (), higher_is_better: bool = True) -> Dict[tuple, Dict[str, Any]]:
    """Per (loss, *group): the Summary of `metric` and, but for the reference, its
    PairedDifference to the reference on the units both have. `group` names record fields kept
    apart (e.g. the number of inner steps)."""
    means = unit_means(records, metric, group)
    out: Dict[tuple, Dict[str, Any]] = {}
    for key, units in means.items():
        entry: Dict[str, Any] = {"summary": summarize(list(units.values()))}
        ref = means.get((reference, *key[1:]))
        if key[0] != reference and ref is not None:
            shared = sorted(set(units) & set(ref), key=str)
            if shared:
                entry["difference"] = paired_difference([units[u] for u in shared],
                                                        [ref[u] for u in shared], higher_is_better)
        out[key] = entry
    return out


def _fmt(x: float, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pvalue(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def markdown_table(comparison: Mapping[tuple, Mapping[str, Any]], metric_label: str,
                   reference: str, group_labels: Sequence[str] = (), scale: float = 1.0,
                   digits: int = 1, order: Optional[Sequence[str]] = None) -> str:
    """One Markdown table: a row per (loss, *group) with mean ± SE [min, max] and, against
    `reference`, the paired difference, wins and both p-values. `scale` multiplies every value
    (e.g. 100 for accuracies in %)."""
    head = ["loss", *group_labels, f"{metric_label} mean ± SE [min, max]",
            f"Δ vs {reference} mean ± SE", "wins", "t-test p", "Wilcoxon p", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rank = {name: i for i, name in enumerate(order or [])}
    def natural(g: Any) -> tuple:
        return (0, g, "") if isinstance(g, (int, float)) else (1, 0, str(g))

    for key in sorted(comparison, key=lambda k: (tuple(natural(g) for g in k[1:]),
                                                 rank.get(k[0], len(rank)), str(k[0]))):
        s: Summary = comparison[key]["summary"]
        cell = (f"{_fmt(s.mean * scale, digits)} ± {_fmt(s.se * scale, digits)} "
                f"[{_fmt(s.minimum * scale, digits)}, {_fmt(s.maximum * scale, digits)}]")
        d: Optional[PairedDifference] = comparison[key].get("difference")
        if d is None:
            diff = ["(reference)" if key[0] == reference else "n/a", "", "", ""]
        else:
            diff = [f"{_fmt(d.mean * scale, digits)} ± {_fmt(d.se * scale, digits)}",
                    f"{d.wins}/{d.n}", _pvalue(d.t_pvalue), _pvalue(d.wilcoxon_pvalue)]
        row = [str(key[0]), *(str(g) for g in key[1:]), cell, *diff, str(s.n)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def to_jsonable(comparison: Mapping[tuple, Mapping[str, Any]],
                group: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """The comparison as a list of plain dicts (nan becomes None), for JSON."""
    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and math.isnan(obj):
            return None
        return obj

    rows = []
    for key, entry in comparison.items():
        row: Dict[str, Any] = {"loss": key[0], **dict(zip(group, key[1:]))}
        row["summary"] = {k: clean(v) for k, v in vars(entry["summary"]).items()}
        if "difference" in entry:
            row["difference"] = {k: clean(v) for k, v in vars(entry["difference"]).items()}
        rows.append(row)
    return rows
