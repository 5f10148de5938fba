"""Table 7: in-distribution against cross-distribution accuracy and cross-entropy of trained models.

    python -m domainbed_itl.scripts.in_vs_cross ./sweep_output --data_dir ./data \
        --domainbed_root ../DomainBed --output_dir analyses [--algorithms ERM ITL]

See docs/analyses.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import numpy as np  # noqa: E402

from ..analysis.aggregate import mean_se  # noqa: E402
from ..analysis.generalisation import accuracy_and_cross_entropy  # noqa: E402
from ..analysis.output import plan_analysis, write_outputs  # noqa: E402
from ..bridge.trained_models import describe_run, predict, RunError  # noqa: E402
from ._cli import CommandParser, add_trained_run_flags, command_main, trained_models  # noqa: E402

SPLITS = ("train", "in_test", "cross_test")
SPLIT_NAMES = {"train": "train (source in-splits)", "in_test": "in-distribution test (source out-splits)",
               "cross_test": "cross-distribution test (target in-splits)"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("in_vs_cross", description=__doc__.split("\n\n")[0])
    add_trained_run_flags(parser)
    return parser


def summarise(rows: List[Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{label: {metric: mean_se over the label's runs}} for every split's accuracy and CE."""
    labels = list(dict.fromkeys(row["label"] for row in rows))
    metrics = [f"{s}_{m}" for s in SPLITS for m in ("accuracy", "cross_entropy")]
    return {label: {m: mean_se([r[m] for r in rows if r["label"] == label]) for m in metrics}
            for label in labels}


def _table(summary: Dict) -> str:
    def cell(stats, percent):
        scale = 100 if percent else 1
        return f"{scale * stats['mean']:.2f}" if percent else f"{stats['mean']:.3g}"

    lines = ["| model | runs | train acc (%) | train CE | test acc (%): in (cross) | test CE: in (cross) |",
             "|---|---|---|---|---|---|"]
    for label, s in summary.items():
        lines.append(
            f"| {label} | {s['train_accuracy']['n']} | {cell(s['train_accuracy'], True)} | "
            f"{cell(s['train_cross_entropy'], False)} | {cell(s['in_test_accuracy'], True)} "
            f"({cell(s['cross_test_accuracy'], True)}) | {cell(s['in_test_cross_entropy'], False)} "
            f"({cell(s['cross_test_cross_entropy'], False)}) |")
    return "\n".join(lines)


def _figure(summary: Dict):
    labels = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(labels), 3.8))
    width = 0.8 / len(SPLITS)
    for ax, metric, title in zip(axes, ("accuracy", "cross_entropy"), ("accuracy (%)", "cross-entropy")):
        scale = 100 if metric == "accuracy" else 1
        for k, split in enumerate(SPLITS):
            stats = [summary[label][f"{split}_{metric}"] for label in labels]
            ax.bar(np.arange(len(labels)) + (k - 1) * width, [scale * s["mean"] for s in stats], width,
                   yerr=[scale * s["se"] for s in stats], label=SPLIT_NAMES[split], capsize=3)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=20)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    return fig


def _run(args: argparse.Namespace) -> int:
    """The command's work; its exit status."""
    plan = plan_analysis(args.output_dir, "in_vs_cross", args.overwrite, [".csv"])
    rows = []
    for run, model, splits in trained_models(args):
        row = describe_run(run, model)
        parts = {"train": [splits.in_splits[i] for i in splits.sources],
                 "in_test": [splits.out_splits[i] for i in splits.sources],
                 "cross_test": [splits.in_splits[i] for i in splits.test_envs]}
        for split, datasets in parts.items():
            logits, labels = predict(model.algorithm, datasets, args.batch_size, args.device)
            for key, value in accuracy_and_cross_entropy(logits, labels).items():
                row[f"{split}_{key}"] = value
        rows.append(row)
        print(f"{model.label} test_envs {model.test_envs} ({run.folder}): "
              + ", ".join(f"{s} {100 * row[s + '_accuracy']:.2f}% CE {row[s + '_cross_entropy']:.4g}"
                          for s in SPLITS), flush=True)
    if not rows:
        raise RunError(f"no run of the algorithms {args.algorithms} under {', '.join(args.inputs)}")
    summary = summarise(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({**r, "test_envs": " ".join(map(str, r["test_envs"]))} for r in rows)
    fig = _figure(summary)
    paths = write_outputs(plan, fig, {"splits": SPLIT_NAMES, "measured_by": "cross-entropy",
                                      "runs": rows, "summary": summary}, {".csv": text.getvalue()})
    plt.close(fig)
    print("\n" + _table(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
