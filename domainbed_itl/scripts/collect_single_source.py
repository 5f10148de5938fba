"""Tables 4 and 10 of Gao et al. (ICML 2022) from a single-source sweep's folder.

    python -m domainbed_itl.scripts.collect_single_source --input_dir ./sweeps/single_source
    python -m domainbed_itl.scripts.collect_single_source --input_dir ... --latex --output results.tex

See docs/single_source.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..bridge.domainbed_env import optional_domainbed
from ..files.outputs import plan_outputs
from ..files.sweepfolder import load_runs, read_manifest
from ..single_source.selection import summarise
from ..single_source.tables import domainbed_labels, render_report
from ._cli import CommandParser, Distinct, command_main


def _run(args: argparse.Namespace) -> int:
    """The command's work; its exit status."""
    fmt = "latex" if args.latex else "markdown" if args.markdown else "text"
    plan = plan_outputs([args.output] if args.output else [], args.overwrite)
    damaged: list = []
    results = summarise(load_runs(args.input_dir), read_manifest(args.input_dir, damaged),
                        damaged)
    if not results.cells:
        raise ValueError(f"no single-source runs in {args.input_dir} "
                         f"({results.ignored_multi_source_runs} multi-source runs ignored)")
    found = optional_domainbed(args.domainbed_root, "domainbed.datasets", "domainbed.algorithms")
    env_names, algorithm_order, dataset_order = (domainbed_labels(results, *found) if found
                                                 else (None, None, None))
    report = render_report(results, fmt, args.algorithms or algorithm_order,
                           args.datasets or dataset_order, env_names, source=args.input_dir)
    if args.output:
        plan.write(args.output, report)
    print(report, end="")
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)  # stdout: the report alone
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("collect_single_source", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_dir", required=True, help="the sweep's output folder")
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--latex", action="store_true")
    style.add_argument("--markdown", action="store_true")
    parser.add_argument("--algorithms", nargs="+", action=Distinct, default=None, help="rows, in this order")
    parser.add_argument("--datasets", nargs="+", action=Distinct, default=None,
                        help="datasets, in this order")
    parser.add_argument("--domainbed_root", default=None,
                        help="DomainBed checkout for domain names (optional)")
    parser.add_argument("--output", default=None, help="also write the report to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print (and with --output, write) the report; 2 on bad input."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
