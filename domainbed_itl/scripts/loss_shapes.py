"""Fig. 5: losses and their gradients against the probability of the true class.

    python -m domainbed_itl.scripts.loss_shapes --losses CE SCE Focal ITL runs/meta/loss.json \
        --num_classes 10 --output_dir figures [--normalise]

See docs/analyses.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import torch  # noqa: E402

from ..analysis.loss_profiles import loss_against_p_true, min_max_normalise, parse_loss  # noqa: E402
from ..analysis.output import plan_analysis, write_outputs  # noqa: E402
from ._cli import CommandParser, command_main, integer  # noqa: E402

PRINTED_P = (0.05, 0.25, 0.5, 0.75, 0.95)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("loss_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["CE", "SCE", "Focal", "ITL"],
                        help="zoo losses (with :k=v parameters), presets or loss files")
    parser.add_argument("--labels", nargs="+", default=None, help="a label per loss (default: as given)")
    parser.add_argument("--num_classes", type=integer, default=10, help="C (default 10, as MNIST)")
    parser.add_argument("--points", type=integer, default=199, help="probabilities on the grid")
    parser.add_argument("--p_min", type=float, default=0.01)
    parser.add_argument("--p_max", type=float, default=0.99)
    parser.add_argument("--normalise", action="store_true", help="rescale each curve to [0, 1]")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def _run(args: argparse.Namespace) -> int:
    """The command's work; its exit status."""
    if args.labels is not None and len(args.labels) != len(args.losses):
        raise ValueError(f"--labels gives {len(args.labels)} labels for {len(args.losses)} losses")
    if args.points < 2 or not 0 < args.p_min < args.p_max < 1:
        raise ValueError(f"need --points >= 2 and 0 < --p_min < --p_max < 1, got {args.points}, "
                         f"{args.p_min}, {args.p_max}")
    plan = plan_analysis(args.output_dir, "loss_shapes", args.overwrite)
    losses = [parse_loss(spec) for spec in args.losses]
    labels = args.labels or [loss.label for loss in losses]
    p = torch.linspace(args.p_min, args.p_max, args.points, dtype=torch.float64)
    curves = []
    for label, spec, loss in zip(labels, args.losses, losses):
        values, grad = loss_against_p_true(loss.fn, p, args.num_classes)
        norm_values, norm_grad = min_max_normalise(values, grad)
        curves.append({"label": label, "spec": spec, "loss": values.tolist(), "gradient": grad.tolist(),
                       "loss_normalised": norm_values.tolist(),
                       "gradient_normalised": norm_grad.tolist()})
    fig, axes = plt.subplots(2, len(curves), figsize=(3.2 * len(curves), 5.6), squeeze=False,
                             sharex=True)
    kind = "_normalised" if args.normalise else ""
    for column, curve in enumerate(curves):
        axes[0, column].plot(p, curve["loss" + kind], color=f"C{column}")
        axes[1, column].plot(p, curve["gradient" + kind], color=f"C{column}")
        axes[0, column].set_title(curve["label"])
        axes[1, column].set_xlabel("p_true")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("loss (normalised)" if args.normalise else "loss")
    axes[1, 0].set_ylabel("d loss / d p_true")
    numbers = {"num_classes": args.num_classes, "p_true": p.tolist(), "normalised_plot": args.normalise,
               "path": "the other classes share 1 - p_true equally", "losses": curves}
    paths = write_outputs(plan, fig, numbers)
    plt.close(fig)
    header = "loss".ljust(max(len(c["label"]) for c in curves) + 2)
    print(f"C = {args.num_classes}; loss (d loss / d p_true) at p_true =")
    print(header + "".join(f"{q:>18}" for q in PRINTED_P))
    for curve in curves:
        index = [int(torch.argmin((p - q).abs())) for q in PRINTED_P]
        print(curve["label"].ljust(len(header)) + "".join(
            f"{curve['loss'][i]:>9.3f} ({curve['gradient'][i]:>6.2f})" for i in index))
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
