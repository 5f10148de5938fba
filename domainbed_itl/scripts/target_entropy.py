"""Fig. 7: entropy of the predictions on the target domains during training, per algorithm.

    python -m domainbed.scripts.train ... --save_model_every_checkpoint   # DomainBed, per run
    python -m domainbed_itl.scripts.target_entropy ./sweep_output --data_dir ./data \
        --domainbed_root ../DomainBed --output_dir analyses [--algorithms ERM ERM_Focal ERM_SCE ITL]

See docs/analyses.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import numpy as np  # noqa: E402

from ..analysis.aggregate import mean_se  # noqa: E402
from ..analysis.entropy import entropy_by_correctness  # noqa: E402
from ..analysis.output import plan_analysis, write_outputs  # noqa: E402
from ..bridge.trained_models import describe_run, load_model, predict, RunError  # noqa: E402
from ._cli import CommandParser, add_trained_run_flags, command_main, trained_models  # noqa: E402

KINDS = {"entropy_correct": "correctly classified", "entropy_incorrect": "misclassified"}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("target_entropy", description=__doc__.split("\n\n")[0])
    add_trained_run_flags(parser)
    return parser


def curves(runs: List[Dict]) -> Dict[str, List[Dict]]:
    """{label: [{step, entropy_correct: mean_se, entropy_incorrect: mean_se, accuracy: mean_se}]}
    over the runs that have a checkpoint at that step."""
    result: Dict[str, List[Dict]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        points = [p for r in runs if r["label"] == label for p in r["checkpoints"]]
        steps = sorted({p["step"] for p in points if p["step"] is not None})
        result[label] = [{"step": step, **{key: mean_se([p[key] for p in points if p["step"] == step])
                                           for key in (*KINDS, "accuracy")}} for step in steps]
    return result


def _figure(summary: Dict[str, List[Dict]]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (key, title) in zip(axes, KINDS.items()):
        for colour, (label, points) in enumerate(summary.items()):
            steps = np.array([p["step"] for p in points], dtype=float)
            mean = np.array([p[key]["mean"] for p in points], dtype=float)
            se = np.array([p[key]["se"] for p in points], dtype=float)
            ax.plot(steps, mean, marker=".", label=label, color=f"C{colour}")
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2, color=f"C{colour}")
        ax.set(title=f"target domains: {title}", xlabel="training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean predictive entropy (nats)")
    axes[0].legend()
    return fig


def _run(args: argparse.Namespace) -> int:
    """The command's work; its exit status."""
    plan = plan_analysis(args.output_dir, "target_entropy", args.overwrite)
    runs = []
    for run, model, splits in trained_models(args):
        targets = [splits.in_splits[i] for i in splits.test_envs]
        points = []
        for checkpoint in run.steps:
            algorithm = load_model(checkpoint.path, args.domainbed_root, args.device).algorithm
            logits, labels = predict(algorithm, targets, args.batch_size, args.device)
            points.append({"step": checkpoint.step, "checkpoint": checkpoint.path.name,
                           **entropy_by_correctness(logits, labels)})
        runs.append({**describe_run(run, model), "checkpoints": points})
        last = points[-1]
        print(f"{model.label} test_envs {model.test_envs} ({run.folder}): {len(points)} checkpoints; "
              f"step {last['step']}: correct {last['entropy_correct']:.4f}, misclassified "
              f"{last['entropy_incorrect']:.4f} nats, accuracy {100 * last['accuracy']:.2f}%", flush=True)
    if not runs:
        raise RunError(f"no run of the algorithms {args.algorithms} under {', '.join(args.inputs)}")
    summary = curves(runs)
    fig = _figure(summary)
    paths = write_outputs(plan, fig, {"entropy": "nats, of softmax predictions on the test "
                                                 "environments' in-splits", "runs": runs,
                                      "curves": summary})
    plt.close(fig)
    print("\nlast step per algorithm: entropy of correct / misclassified target predictions (nats)")
    for label, points in summary.items():
        if points:
            p = points[-1]
            print(f"  {label}: step {p['step']}: {p['entropy_correct']['mean']:.4f} +/- "
                  f"{p['entropy_correct']['se']:.4f} / {p['entropy_incorrect']['mean']:.4f} +/- "
                  f"{p['entropy_incorrect']['se']:.4f} ({p['accuracy']['n']} runs)")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
