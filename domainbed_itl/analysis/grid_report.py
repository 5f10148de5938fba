"""The grid search's report (scripts/grid_search): the best member of each family, its rows, files.

See docs/losses.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import comparison
from ..files.atomic import write_atomic
from ..losses.families import get_family
from ..losses.lossfile import LossSpec

GRID_MD, GRID_JSON, GRID_CSV = "grid.md", "grid.json", "grid.csv"
GRID_OUTPUTS = (GRID_MD, GRID_JSON, GRID_CSV)
Comparison = Mapping[tuple, Mapping[str, Any]]
Grid = Mapping[str, Mapping[str, LossSpec]]
CSV_FIELDS = ("inner_steps", "family", "loss", "parameters", "mean", "se", "min", "max", "n",
              "delta_mean", "delta_se", "wins", "t_pvalue", "best", "grid_best", "grid_best_delta_mean",
              "grid_best_delta_se", "grid_best_wins", "grid_best_t_pvalue")


def _rank(entry: Mapping[str, Any]) -> Tuple[float, float]:
    difference = entry.get("difference")
    return (difference.mean if difference is not None else -math.inf, entry["summary"].mean)


def best_members(result: Comparison, grid: Grid) -> Dict[Tuple[str, Any], str]:
    """{(family, length): its best member's label} (docs/losses.md); `result` keyed
    by (loss, length). A family with no member at a length has no entry there."""
    best: Dict[Tuple[str, Any], str] = {}
    for family, members in grid.items():
        for loss, *rest in result:
            if loss not in members:
                continue
            key = (family, *rest)
            if key not in best or _rank(result[(loss, *rest)]) > _rank(result[(best[key], *rest)]):
                best[key] = loss
    return best


def grid_winners(result: Comparison, grid: Grid) -> Dict[Any, str]:
    """{length: the best member over every family}, ranked as `best_members` ranks a family's."""
    winners: Dict[Any, str] = {}
    for (_, steps), loss in best_members(result, grid).items():
        if steps not in winners or _rank(result[(loss, steps)]) > _rank(result[(winners[steps], steps)]):
            winners[steps] = loss
    return winners


def against_winners(records: Sequence[Mapping[str, Any]], metric: str,
                    winners: Mapping[Any, str]) -> Comparison:
    """Per (loss, length): `metric`'s paired difference to that length's grid winner
    (`grid_winners`), on the seeds both have; the winner itself has none."""
    out: Dict[tuple, Mapping[str, Any]] = {}
    for steps, winner in winners.items():
        at = [r for r in records if r["inner_steps"] == steps]
        out.update(comparison.compare(at, metric, winner, ["inner_steps"]))
    return out


def _number(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else x


def grid_rows(result: Comparison, grid: Grid, extras: Sequence[str],
              records: Optional[Sequence[Mapping[str, Any]]] = None,
              metric: str = "heldout_acc") -> List[Dict[str, Any]]:
    """One row per (loss, length): grid members by family in grid order, then `extras`; given
    the `records` behind `result`, each row's difference in `metric` to the grid's best member
    too (`against_winners`)."""
    best, winners = best_members(result, grid), grid_winners(result, grid)
    versus_winner = None if records is None else against_winners(records, metric, winners)
    family_of = {loss: family for family, members in grid.items() for loss in members}
    order = [*family_of, *extras]
    rows = []
    for loss, steps in sorted(result, key=lambda k: (k[1], order.index(k[0]))):
        entry, family = result[(loss, steps)], family_of.get(loss)
        s, d = entry["summary"], entry.get("difference")
        spec = grid[family][loss] if family else None
        w = (versus_winner or {}).get((loss, steps), {}).get("difference")
        names = None if spec is None else get_family(spec.family, spec.order).param_names()
        rows.append({
            "inner_steps": steps, "family": family, "loss": loss,
            "parameters": None if spec is None else dict(zip(names, spec.parameters)),
            "mean": s.mean, "se": _number(s.se), "min": s.minimum, "max": s.maximum, "n": s.n,
            "delta_mean": None if d is None else d.mean, "delta_se": None if d is None else _number(d.se),
            "wins": None if d is None else d.wins, "t_pvalue": None if d is None else _number(d.t_pvalue),
            "best": family is not None and best.get((family, steps)) == loss,
            "grid_best": winners.get(steps) if versus_winner is not None else None,
            "grid_best_delta_mean": None if w is None else w.mean,
            "grid_best_delta_se": None if w is None else _number(w.se),
            "grid_best_wins": None if w is None else w.wins,
            "grid_best_t_pvalue": None if w is None else _number(w.t_pvalue)})
    return rows


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _delta(mean: Optional[float], se: Optional[float], wins: Optional[int], n: int,
           p: Optional[float], itself: bool, label: str) -> List[str]:
    if mean is None:
        return [label if itself else "n/a", "", ""]
    return [f"{_pct(mean)} ± {_pct(se)}", f"{wins}/{n}",
            "n/a" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")]


def grid_markdown(rows: Sequence[Mapping[str, Any]], reference: str) -> str:
    """A table per length: family, loss, held-out accuracy, Δ vs `reference`, seeds won, t-test
    p, the best member of each family marked, and, where the rows carry it, the same three
    against the grid's best member (picked on these seeds, so the comparison favours it)."""
    parts = []
    for steps in sorted({r["inner_steps"] for r in rows}):
        at = [r for r in rows if r["inner_steps"] == steps]
        winner = next((r["grid_best"] for r in at if r.get("grid_best")), None)
        head = (f"| family | loss | held-out acc. mean ± SE [min, max] | Δ vs {reference} mean ± SE "
                "| seeds won | t-test p | best |")
        if winner:
            head += f" Δ vs the grid's best ({winner}) mean ± SE | seeds won | t-test p |"
        lines = [f"### Held-out accuracy (%), inner steps {steps}", "", head,
                 "|" + "---|" * (10 if winner else 7)]
        for r in at:
            cells = [r["family"] or "(extra)", r["loss"],
                     f"{_pct(r['mean'])} ± {_pct(r['se'])} [{_pct(r['min'])}, {_pct(r['max'])}]",
                     *_delta(r["delta_mean"], r["delta_se"], r["wins"], r["n"], r["t_pvalue"],
                             r["loss"] == reference, "(reference)"),
                     "**best**" if r["best"] else ""]
            if winner:
                cells += _delta(r["grid_best_delta_mean"], r["grid_best_delta_se"],
                                r["grid_best_wins"], r["n"], r["grid_best_t_pvalue"],
                                r["loss"] == winner, "(the grid's best)")
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def grid_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV (parameters as JSON)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "parameters": "" if r["parameters"] is None else json.dumps(r["parameters"])})
    return out.getvalue()


def write_grid_report(output_dir: Path, settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                      reference: str, details: str, payload: Mapping[str, Any]) -> str:
    """Replace grid.json (settings, rows and `payload`), grid.csv and grid.md (the grid tables,
    then `details`); returns the grid tables."""
    tables = grid_markdown(rows, reference)
    text = "\n".join(["# Grid search, meta protocol", "",
                      "Settings: `" + json.dumps(settings, sort_keys=True) + "`", "", tables, "",
                      "## Every metric", "", details, ""])
    output_dir = Path(output_dir)
    write_atomic(output_dir / GRID_JSON, json.dumps({"settings": settings, "rows": list(rows),
                                                     **payload}, indent=1) + "\n", overwrite=True)
    write_atomic(output_dir / GRID_CSV, grid_csv(rows), overwrite=True)
    write_atomic(output_dir / GRID_MD, text, overwrite=True)
    return tables
