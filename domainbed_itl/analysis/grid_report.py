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

from ..files.atomic import write_atomic
from ..losses.families import get_family
from ..losses.lossfile import LossSpec

GRID_MD, GRID_JSON, GRID_CSV = "grid.md", "grid.json", "grid.csv"
GRID_OUTPUTS = (GRID_MD, GRID_JSON, GRID_CSV)
Comparison = Mapping[tuple, Mapping[str, Any]]
Grid = Mapping[str, Mapping[str, LossSpec]]
CSV_FIELDS = ("inner_steps", "family", "loss", "parameters", "mean", "se", "min", "max", "n",
              "delta_mean", "delta_se", "wins", "t_pvalue", "best")


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


def _number(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else x


def grid_rows(result: Comparison, grid: Grid, extras: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per (loss, length): grid members by family in grid order, then `extras`."""
    best = best_members(result, grid)
    family_of = {loss: family for family, members in grid.items() for loss in members}
    order = [*family_of, *extras]
    rows = []
    for loss, steps in sorted(result, key=lambda k: (k[1], order.index(k[0]))):
        entry, family = result[(loss, steps)], family_of.get(loss)
        s, d = entry["summary"], entry.get("difference")
        spec = grid[family][loss] if family else None
        names = None if spec is None else get_family(spec.family, spec.order).param_names()
        rows.append({
            "inner_steps": steps, "family": family, "loss": loss,
            "parameters": None if spec is None else dict(zip(names, spec.parameters)),
            "mean": s.mean, "se": _number(s.se), "min": s.minimum, "max": s.maximum, "n": s.n,
            "delta_mean": None if d is None else d.mean, "delta_se": None if d is None else _number(d.se),
            "wins": None if d is None else d.wins, "t_pvalue": None if d is None else _number(d.t_pvalue),
            "best": family is not None and best.get((family, steps)) == loss})
    return rows


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def grid_markdown(rows: Sequence[Mapping[str, Any]], reference: str) -> str:
    """A table per length: family, loss, held-out accuracy, Δ vs `reference`, seeds won, t-test
    p, and the best member of each family marked."""
    parts = []
    for steps in sorted({r["inner_steps"] for r in rows}):
        lines = [f"### Held-out accuracy (%), inner steps {steps}", "",
                 f"| family | loss | held-out acc. mean ± SE [min, max] | Δ vs {reference} mean ± SE "
                 "| seeds won | t-test p | best |", "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["inner_steps"] == steps):
            if r["delta_mean"] is None:
                delta = ["(reference)" if r["loss"] == reference else "n/a", "", ""]
            else:
                p = r["t_pvalue"]
                delta = [f"{_pct(r['delta_mean'])} ± {_pct(r['delta_se'])}", f"{r['wins']}/{r['n']}",
                         "n/a" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")]
            lines.append("| " + " | ".join([
                r["family"] or "(extra)", r["loss"],
                f"{_pct(r['mean'])} ± {_pct(r['se'])} [{_pct(r['min'])}, {_pct(r['max'])}]",
                *delta, "**best**" if r["best"] else ""]) + " |")
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
