"""Fig. 4 (and Fig. 6): loss-search runs side by side against outer steps, inner trainings and time.

    python -m domainbed_itl.scripts.plot_search --runs IFT=runs/ift/metrics.jsonl \
        CMA-ES=runs/cma/metrics.jsonl --output_dir figures

See docs/cma_search.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

from ..analysis.output import plan_analysis, write_outputs  # noqa: E402
from ..analysis.search_curves import at_budget, search_curve  # noqa: E402
from ..files.runfolder import read_metrics  # noqa: E402
from ._cli import CommandParser, command_main, file_name  # noqa: E402

# (metric, label, y scale): M on a log scale, so that a diverging run does not flatten the others.
ROWS = (("outer_heldout_loss", "held-out loss M", "log"),
        ("outer_heldout_acc", "held-out accuracy", "linear"),
        ("inner_source_acc", "inner source accuracy", "linear"))
COLUMNS = (("step", "outer step (CMA-ES: generation)"), ("inner_trainings", "inner trainings"),
           ("wall_clock_s", "wall-clock (s)"))


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("plot_search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="LABEL=METRICS",
                        help="labelled metrics.jsonl files, e.g. IFT=runs/ift/metrics.jsonl")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--stem", type=file_name, default="search_curves",
                        help="output file name without suffix")
    parser.add_argument("--full", action="store_true",
                        help="plot every run whole instead of cutting to the common budget")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def parse_runs(entries: Sequence[str]) -> List[Tuple[str, Path]]:
    """(label, path) per `label=path` entry; ValueError naming a malformed or repeated one."""
    runs: List[Tuple[str, Path]] = []
    for entry in entries:
        label, _, path = entry.partition("=")
        if not label or not path:
            raise ValueError(f"--runs entry {entry!r}: expected LABEL=METRICS (a metrics.jsonl)")
        if label in dict(runs):
            raise ValueError(f"--runs label {label!r} given twice")
        runs.append((label, Path(path)))
    return runs


def _label(label: str, records: Sequence[dict]) -> str:
    popsize = records[-1].get("popsize")
    return f"{label} (best of {popsize} per generation)" if popsize else label


def _run(args: argparse.Namespace) -> int:
    """The command's work; its exit status."""
    runs = parse_runs(args.runs)
    plan = plan_analysis(args.output_dir, args.stem, args.overwrite)
    records: Dict[str, List[dict]] = {}
    curves = {}
    for label, path in runs:
        records[label] = read_metrics(path)
        try:
            curves[label] = search_curve(records[label])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    budget = at_budget(curves)
    shown = curves if args.full else budget["curves"]
    fig, axes = plt.subplots(len(ROWS), len(COLUMNS), figsize=(13, 9.5), squeeze=False)
    for r, (metric, metric_label, scale) in enumerate(ROWS):
        for c, (cost, cost_label) in enumerate(COLUMNS):
            ax = axes[r, c]
            for number, (label, curve) in enumerate(shown.items()):
                ax.plot(curve[cost], curve[metric], marker=".", color=f"C{number}",
                        label=_label(label, records[label]))
            if cost == "inner_trainings" and args.full:
                ax.axvline(budget["budget"], color="grey", ls=":", lw=1)
            ax.set(xlabel=cost_label, ylabel=metric_label, yscale=scale)
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    title = args.title or (f"equal budget: {budget['budget']} inner trainings" if not args.full else "")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    summary = {label: {"steps": len(curve["step"]), "inner_trainings": curve["inner_trainings"][-1],
                       "wall_clock_s": curve["wall_clock_s"][-1],
                       "final_outer_heldout_loss": curve["outer_heldout_loss"][-1],
                       "best_outer_heldout_loss": min(curve["outer_heldout_loss"]),
                       "final_outer_heldout_acc": curve["outer_heldout_acc"][-1],
                       "best_outer_heldout_acc": max(curve["outer_heldout_acc"])}
               for label, curve in shown.items()}
    numbers = {"budget_inner_trainings": budget["budget"], "cut_to_budget": not args.full,
               "runs": {label: str(path) for label, path in runs}, "summary": summary,
               "curves": shown}
    paths = write_outputs(plan, fig, numbers)
    plt.close(fig)
    print(f"{'run':<12} {'steps':>6} {'inner trainings':>16} {'wall (s)':>9} {'final M':>8} "
          f"{'best M':>8} {'final acc':>9}")
    for label, row in summary.items():
        print(f"{label:<12} {row['steps']:>6} {row['inner_trainings']:>16} {row['wall_clock_s']:>9.1f} "
              f"{row['final_outer_heldout_loss']:>8.4f} {row['best_outer_heldout_loss']:>8.4f} "
              f"{row['final_outer_heldout_acc']:>9.3f}")
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
