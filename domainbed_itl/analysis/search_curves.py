"""Loss-search runs as curves against three costs: outer steps, inner trainings and wall-clock.

See docs/cma_search.md.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

METRICS = ("outer_heldout_loss", "outer_heldout_acc", "inner_source_acc")
COSTS = ("step", "inner_trainings", "wall_clock_s")


def inner_trainings(record: Mapping[str, Any]) -> int:
    """The inner trainings done up to and including `record`'s step."""
    if "inner_trainings" in record:
        return int(record["inner_trainings"])
    try:
        per_step = len(record["per_domain"]["heldout_acc"])
    except (KeyError, TypeError):
        raise ValueError(f"record of step {record.get('step')!r} says neither its inner_trainings "
                         "nor per_domain.heldout_acc (one entry per inner training)") from None
    return int(record["step"]) * per_step


def search_curve(records: Sequence[Mapping[str, Any]]) -> Dict[str, List[float]]:
    """The run's costs (step, cumulative inner trainings, cumulative wall-clock seconds) and
    metrics per record, in step order; ValueError naming what is missing or out of order."""
    if not records:
        raise ValueError("a run without records")
    curve: Dict[str, List[float]] = {key: [] for key in (*COSTS, *METRICS)}
    wall = 0.0
    for record in records:
        missing = [k for k in ("step", "time_step_s", *METRICS) if k not in record]
        if missing:
            raise ValueError(f"record of step {record.get('step')!r} lacks {', '.join(missing)}")
        if curve["step"] and record["step"] <= curve["step"][-1]:
            raise ValueError(f"steps out of order: {record['step']} after {curve['step'][-1]}")
        wall += float(record["time_step_s"])
        curve["step"].append(int(record["step"]))
        curve["inner_trainings"].append(inner_trainings(record))
        curve["wall_clock_s"].append(wall)
        for key in METRICS:
            curve[key].append(float(record[key]))
    return curve


def at_budget(curves: Mapping[str, Mapping[str, List[float]]]) -> Dict[str, Any]:
    """{"budget": the smallest run's total inner trainings, "curves": each run's points within it}."""
    budget = min(curve["inner_trainings"][-1] for curve in curves.values())
    cut = {}
    for label, curve in curves.items():
        keep = sum(1 for n in curve["inner_trainings"] if n <= budget)
        cut[label] = {key: list(values[:keep]) for key, values in curve.items()}
    return {"budget": budget, "curves": cut}
