"""A grid over loss families of one or two parameters, in the loss evaluation's meta protocol.

    python -m domainbed_itl.scripts.grid_search --data_dir ./data \\
        --grid label_smoothing=0.05,0.1,0.2,0.3 poly1=-1,1,2,4 focal=0.5,1,2,3 gce=0.3,0.7 \\
        --losses CE learned=runs/meta/loss.json --seeds 0 1 2 3 4 --inner_steps 4000 \\
        --output_dir runs/grid

Every grid member (domainbed_itl.losses.grid: NAME=V1,V2,... for a family of one parameter,
NAME.PARAM=V1,V2,... per parameter of a family of two, the grid their product) and every extra
loss of --losses (CE, a zoo loss, a preset or a loss file, LABEL=LOSS to name one; default CE)
is trained on the same seeds as `evaluate_loss meta` trains (same networks, minibatches and
flags), and compared with --reference (default CE) seed by seed. The best member of each family
is the one with the highest mean paired difference in held-out accuracy.

Writes to --output_dir: `grid.md` (per number of inner steps, a table of every member by family
and every extra loss: held-out accuracy mean ± SE [min, max], Δ vs the reference mean ± SE,
seeds won, paired t-test p, the best member of each family marked; then `evaluate_loss`'s tables
of every metric), `grid.json` (settings, the grid, those rows, statistics and every record) and
`grid.csv` (the rows). Each unit (a loss on a seed) is kept in --output_dir/checkpoint.pt as it
finishes: running the command again computes only the units it lacks (after an interruption,
or with more grid points, losses or seeds) and rewrites the report; units computed with other
settings or data are refused; --overwrite starts again. The checkpoint is an `evaluate_loss
meta` checkpoint, so a grid can also continue the units of such an evaluation.

A bad --grid entry (an unknown family, a family of more than two parameters, a value outside its
parameter's interval, a member that could not train) is refused in one line naming it before
anything runs. Exit status: 0 done, 2 bad input, 130 interrupted (run it again to continue).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence, Set

from ..analysis import comparison
from ..analysis.grid_report import GRID_OUTPUTS, grid_rows, write_grid_report
from ..analysis.loss_evaluation import tables
from ..bridge.loss_evaluation import EvaluationInputError, parse_losses
from ..datasets import num_classes
from ..files.runfolder import RunKind, open_run_folder
from ..losses.grid import parse_grid
from ..losses.lossfile import LossSpec
from ..meta.evaluate import EVALUATION_RUN
from ._cli import (Distinct, add_data_flags, check_data_flags, check_data_sizes, command_line, data_flags,
                   explicit_flags, load_data, parse_device, run_command)
from ._evaluation import (add_meta_protocol_flags, evaluate_meta, meta_losses, meta_metrics,
                          meta_protocol, meta_settings)

# An evaluation's checkpoint, with the grid's report beside it (--overwrite moves them all aside).
GRID_RUN = RunKind(EVALUATION_RUN.name, EVALUATION_RUN.format, EVALUATION_RUN.unit,
                   EVALUATION_RUN.outputs + GRID_OUTPUTS)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m domainbed_itl.scripts.grid_search",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", nargs="+", action=Distinct, required=True,
                        help="NAME=V1,V2,... (a family of one parameter, e.g. label_smoothing, "
                             "poly1, focal, gce) or NAME.PARAM=V1,V2,... (e.g. sce.alpha)")
    parser.add_argument("--losses", nargs="+", action=Distinct, default=["CE"],
                        help="extra losses beside the grid: CE, a zoo loss, a preset or a loss "
                             "file; LABEL=LOSS to name one (default: CE)")
    parser.add_argument("--reference", default=None,
                        help="the --losses label every loss is compared with (default: CE if "
                             "given, else the first)")
    add_data_flags(parser, sampling=False)
    add_meta_protocol_flags(parser)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="start again in --output_dir")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace, command: str, explicit: Set[str]) -> int:
    """Evaluate the grid and the extra losses, then write the report; `explicit`: the flags given
    on the command line (a size larger than the data is refused for those, noted otherwise)."""
    extras, reference = parse_losses(args.losses, args.reference, args.dataset)
    protocol, device, flags = meta_protocol(args), parse_device(args.device), data_flags(args)
    check_data_flags(flags)
    classes = num_classes(args.dataset)
    data = None if classes is not None else load_data(flags)
    grid = parse_grid(args.grid, classes or data.num_classes)
    members: Dict[str, LossSpec] = {label: spec for family in grid.values()
                                    for label, spec in family.items()}
    taken = sorted(set(members) & set(extras))
    if taken:
        raise EvaluationInputError(f"--losses label {taken[0]!r} is also a grid member's; label "
                                   "the extra loss otherwise")
    with open_run_folder(args.output_dir, GRID_RUN, resume=not args.overwrite,
                         overwrite=args.overwrite, command=command) as folder:
        data = data or load_data(flags)
        check_data_sizes(data, {"batch_size": protocol.batch_size, "eval_size": protocol.eval_size},
                         explicit)
        if classes not in (None, data.num_classes):  # checked for the classes of the data
            members = {label: spec for family in parse_grid(args.grid, data.num_classes).values()
                       for label, spec in family.items()}
        losses = {**{label: (spec.module().to(device), spec.definition())
                     for label, spec in members.items()},
                  **meta_losses(extras, device, data.num_classes)}
        records = evaluate_meta(folder, data, losses, args, protocol, device, command)
        result = comparison.compare(records, "heldout_acc", reference, ["inner_steps"])
        rows = grid_rows(result, grid, list(extras))
        details, stats = tables(records, meta_metrics(protocol), reference, list(losses),
                                ["inner_steps"])
        grid_table = write_grid_report(
            folder.path, meta_settings(args, protocol), rows, reference, details,
            {"grid": {family: {label: spec.definition() for label, spec in points.items()}
                      for family, points in grid.items()},
             "losses": extras, "reference": reference, "statistics": stats, "records": records})
    print(grid_table)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command, explicit = command_line(argv, "grid_search"), explicit_flags(parser, argv)
    return run_command(lambda: run(args, command, explicit),
                       interrupted=lambda: f"run the same command again to continue the grid in "
                                           f"{args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())
