"""A grid over loss families of one or two parameters, in the loss evaluation's meta protocol.

See docs/losses.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence, Set

from ..analysis import comparison
from ..analysis.grid_report import GRID_OUTPUTS, grid_rows, write_grid_report
from ..analysis.evaluation_report import tables
from ..bridge.loss_evaluation import EvaluationInputError, parse_losses
from ..datasets import num_classes
from ..files.runfolder import RunKind, open_run_folder
from ..losses.grid import parse_grid
from ..losses.lossfile import LossSpec
from ..meta.evaluate import EVALUATION_RUN
from ._cli import (CommandParser, Distinct, add_data_flags, check_data_flags, check_data_sizes, command_line,
                   data_flags, explicit_flags, load_data, parse_device, run_command)
from ._evaluation import (DefaultsHelp, add_meta_protocol_flags, evaluate_meta, meta_losses,
                          meta_metrics, meta_protocol, meta_settings, name_reports, said_once)

# An evaluation's checkpoint, with the grid's report beside it (--overwrite moves them all aside).
GRID_RUN = RunKind(EVALUATION_RUN.name, EVALUATION_RUN.format, EVALUATION_RUN.unit,
                   EVALUATION_RUN.outputs + GRID_OUTPUTS)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = CommandParser("grid_search", description=__doc__.split("\n\n")[0],
                           formatter_class=DefaultsHelp)
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
    parser.add_argument("--output_dir", required=True,
                        help="where the reports (grid.md, grid.json, grid.csv) and the checkpoint go")
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
        with said_once():
            result = comparison.compare(records, "heldout_acc", reference, ["inner_steps"])
            details, stats = tables(records, meta_metrics(protocol), reference, list(losses),
                                    ["inner_steps"])
            rows = grid_rows(result, grid, list(extras), records)
        grid_table = write_grid_report(
            folder.path, meta_settings(args, protocol), rows, reference, details,
            {"grid": {family: {label: spec.definition() for label, spec in points.items()}
                      for family, points in grid.items()},
             "losses": extras, "reference": reference, "statistics": stats, "records": records})
    print(grid_table)
    name_reports([folder.path / name for name in GRID_OUTPUTS])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (docs/losses.md)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command, explicit = command_line(argv, "grid_search"), explicit_flags(parser, argv)
    return run_command(lambda: run(args, command, explicit),
                       interrupted=lambda: f"run the same command again to continue the grid in "
                                           f"{args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())
