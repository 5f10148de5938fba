"""Plot a meta-training run's learning curve, as in the paper's Fig. 3.

    python -m domainbed_itl.scripts.plot_meta runs/meta/metrics.jsonl --output runs/meta/curve.png

See docs/meta_learning.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..analysis.output import figure_bytes  # noqa: E402
from ..files.outputs import OutputPlan, plan_outputs  # noqa: E402
from ..files.runfolder import read_metrics  # noqa: E402
from ..meta.config import META_PRESETS  # noqa: E402
from ._cli import CommandParser, command_main  # noqa: E402

STATIONARY_RATIO = META_PRESETS["stationary"]["inner_stop_ratio"]


def plot_meta(records: Sequence[Dict[str, Any]], output: str | Path | OutputPlan,
              title: str = "") -> Path:
    """Save the Fig. 3-style learning curve of `records`, with its diagnostics, at `output` (a
    path, in the format its extension names, or the OutputPlan of one: its first path)."""
    plan = output if isinstance(output, OutputPlan) else plan_outputs([output], figures=[output])
    steps = [r["step"] for r in records]
    diagnostics = all("solver_residual" in r and "inner_grad_norm_ratio" in r for r in records)
    fig, axes = plt.subplots(2 if diagnostics else 1, 2, figsize=(10, 8.6 if diagnostics else 3.8),
                             squeeze=False)
    (ax_acc, ax_loss) = axes[0]
    ax_acc.plot(steps, [100 * r["inner_source_acc"] for r in records], marker=".",
                label="inner loop: source domains")
    ax_acc.plot(steps, [100 * r["outer_heldout_acc"] for r in records], marker=".",
                label="outer loop: held-out domain")
    ax_acc.set(xlabel="outer step (loss update)", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    ax_loss.plot(steps, [r["outer_heldout_loss"] for r in records], marker=".", color="C3")
    ax_loss.set(xlabel="outer step (loss update)", ylabel="cross-entropy",
                title="held-out loss M")
    if diagnostics:
        _plot_diagnostics(records, steps, *axes[1])
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    data = figure_bytes(fig, plan.paths[0], dpi=120)
    plt.close(fig)
    return plan.write(plan.paths[0], data)


def _plot_diagnostics(records: Sequence[Dict[str, Any]], steps: List[int], ax_stat, ax_res) -> None:
    ax_stat.semilogy(steps, [r["inner_grad_norm_ratio"] for r in records], marker=".", color="C2",
                     label="this run (lower is better; the IFT assumes 0)")
    ax_stat.axhline(1.0, color="C3", ls=":", lw=1, label="1: no closer than at the start")
    ax_stat.axhline(STATIONARY_RATIO, color="C2", ls=":", lw=1,
                    label=f"{STATIONARY_RATIO:g}: where the stationary preset stops")
    ax_stat.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small")
    ax_stat.set(xlabel="outer step (loss update)", ylabel="‖∇L(θ returned)‖ / ‖∇L(θ start)‖",
                title="stationarity of the inner networks")
    ax_res.semilogy(steps, [r["solver_residual"] for r in records], marker=".", color="C4",
                    label="linear solve: relative residual (lower is better)")
    ax_res.axhline(1.0, color="C4", ls=":", lw=1, label="residual 1: no better than no solve")
    ax_res.set(xlabel="outer step (loss update)", ylabel="‖H u + v‖ / ‖v‖",
               title="hypergradient trust")
    handles, labels = ax_res.get_legend_handles_labels()
    refs = [(r["step"], r["reference"]["cosine"]) for r in records if "reference" in r]
    if refs:
        twin = ax_res.twinx()
        twin.plot(*zip(*refs), "s", color="C1", label="cosine to MINRES reference (right axis)")
        twin.axhline(1.0, color="C1", ls=":", lw=1, label="cosine 1: the reference's direction")
        twin.set(ylim=(-1.05, 1.05), ylabel="cosine")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax_res.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small")


def _run(args: argparse.Namespace) -> int:
    """The command's work; its exit status."""
    output = args.output or Path(args.metrics).with_name("curve.png")
    plan = plan_outputs([output], args.overwrite, figures=[output])
    records = read_metrics(args.metrics)
    title = args.title or default_title(args.metrics, records)
    print(f"wrote {plot_meta(records, plan, title)}")
    return 0


def default_title(metrics: str | Path, records: Sequence[Dict[str, Any]]) -> str:
    """The run's folder and its number of outer steps."""
    folder = Path(metrics).resolve().parent.name
    return f"meta-training run {folder}: {len(records)} outer step{'s' * (len(records) != 1)}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = CommandParser("plot_meta", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument("--output", default=None, help="figure path, its format named by its extension "
                                                  "(.png, .pdf, .svg, ...; curve.png beside the "
                                                  "metrics if not given)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--title", default="",
                   help="figure title (default: the run's folder and its outer steps)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: metrics.jsonl in, PNG out."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
