"""The loss evaluation's report (scripts/evaluate_loss): its metrics, tables and two files.

See docs/loss_search.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Sequence, Tuple

from ..files.outputs import OutputPlan, plan_outputs
from ..files.reading import read_text
from . import comparison

REPORT_MD, REPORT_JSON = "evaluation.md", "evaluation.json"


class Metric(NamedTuple):
    """A record field in the tables: its label, the scale and digits it is shown with, and
    whether a higher value is better (for counting wins)."""

    field: str
    label: str
    scale: float
    digits: int
    higher_is_better: bool


META_METRICS = [Metric("heldout_acc", "held-out acc. (%)", 100, 1, True),
                Metric("heldout_ce", "held-out CE", 1, 3, False),
                Metric("source_acc", "source acc. (%)", 100, 1, True),
                Metric("gap", "source − held-out (pts)", 100, 1, False)]
# With a stopping rule: how long each loss trained and how close it came to a stationary point.
CONVERGENCE_METRICS = [Metric("inner_steps_used", "inner steps used", 1, 0, False),
                       Metric("stationarity", "stationarity (final / start gradient norm)", 1, 3,
                              False)]
DOMAINBED_METRICS = [Metric("test_acc", "test acc. (%), training-domain validation", 100, 1, True),
                     Metric("last_test_acc", "test acc. (%), last checkpoint", 100, 1, True),
                     Metric("val_acc", "training-domain validation acc. (%)", 100, 1, True)]


def tables(records: List[Dict[str, Any]], metrics: Sequence[Metric], reference: str,
           order: Sequence[str], group: Sequence[str]) -> Tuple[str, Dict[str, Any]]:
    """(the Markdown tables, the statistics as JSON) of `records` against `reference`: a table
    per metric, rows per (loss, *group) in `order`, then the first metric per domain."""
    parts, stats = [], {}
    for metric in metrics:
        result = comparison.compare(records, metric.field, reference, group, metric.higher_is_better)
        stats[metric.field] = comparison.to_jsonable(result, group)
        parts.append(f"### {metric.label}\n\n" + comparison.markdown_table(
            result, metric.label, reference, group, metric.scale, metric.digits, order))
    first = metrics[0]
    per_domain = comparison.compare(records, first.field, reference, [*group, "domain"],
                                    first.higher_is_better)
    parts.append(f"### {first.label}, per domain\n\n" + comparison.markdown_table(
        per_domain, first.label, reference, [*group, "domain"], first.scale, first.digits, order))
    return "\n\n".join(parts), stats


def plan_report(output_dir: Path, protocol: str) -> OutputPlan:
    """The report files in `output_dir`, checked before the evaluation starts: new files, or
    those of an earlier report of the same `protocol` there (rewritten as results come in);
    OutputExists for files of anything else."""
    paths = [Path(output_dir) / REPORT_JSON, Path(output_dir) / REPORT_MD]
    try:
        earlier = json.loads(read_text(paths[0], what="report"))["settings"]["protocol"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = None
    return plan_outputs(paths, overwrite=earlier == protocol)


def write_report(plan: OutputPlan, title: str, settings: Mapping[str, Any], body: str,
                 payload: Mapping[str, Any]) -> None:
    """Write evaluation.json (`payload`) and evaluation.md (title, settings and `body`) through
    `plan` (`plan_report`)."""
    lines = [f"# {title}", "", "Settings: `" + json.dumps(settings, sort_keys=True) + "`", "", body, ""]
    json_path, md_path = plan.paths
    plan.write(json_path, json.dumps(payload, indent=1) + "\n")
    plan.write(md_path, "\n".join(lines))
