"""Friedman + Nemenyi tests and critical-difference diagrams (Fig. 2 of Gao et al., ICML 2022).

    python -m domainbed_itl.scripts.significance --output_dir ./significance \
        --single_source_dir ./sweeps/single_source --multi_source_dir ./sweeps/domainbed \
        --algorithms ERM CORAL SagNet Mixup ITL --domainbed_root ../DomainBed

See docs/single_source.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..analysis.friedman_nemenyi import cd_diagram_png, format_result, friedman_nemenyi
from ..analysis.multi_source import multi_source_blocks
from ..analysis.table_rows import check_subset
from ..bridge.domainbed_env import import_domainbed, optional_domainbed
from ..files.outputs import plan_outputs
from ..files.runlock import folder_lock
from ..files.sweepfolder import load_runs, read_manifest, records_of
from ..single_source.selection import BLOCK_LEVELS, summarise
from ..single_source.tables import domainbed_labels
from ._cli import CommandParser, Distinct, command_main

Table = Dict[str, Dict[str, float]]


def single_source_table(input_dir: str, level: str, algorithms: Optional[Sequence[str]],
                        datasets: Optional[Sequence[str]], domainbed_root: Optional[str]
                        ) -> Tuple[Table, List[str], List[str]]:
    """{block: {algorithm: accuracy}} of a single-source sweep, its algorithms, and notes."""
    damaged: List[str] = []
    results = summarise(load_runs(input_dir), read_manifest(input_dir, damaged), damaged)
    if not results.cells:
        raise ValueError(f"no single-source runs in {input_dir}")
    found = optional_domainbed(domainbed_root, "domainbed.datasets", "domainbed.algorithms")
    env_names, algorithm_order, dataset_order = (domainbed_labels(results, *found) if found
                                                 else (None, None, None))
    algorithms = check_subset("algorithm", algorithms, algorithm_order or results.algorithms)
    datasets = check_subset("dataset", datasets, dataset_order or results.datasets)
    notes = [f"single-source: {len(results.problems)} missing or incomplete runs leave their cells "
             f"out (see collect_single_source)"] if results.problems else []
    notes += _damaged_note("single-source", results.damaged)
    return results.scores(level, algorithms, datasets, env_names), algorithms, notes


def multi_source_table(input_dir: str, level: str, algorithms: Optional[Sequence[str]],
                       datasets: Optional[Sequence[str]], domainbed_root: Optional[str]
                       ) -> Tuple[Table, List[str], List[str]]:
    """{block: {algorithm: accuracy}} of a DomainBed multi-source sweep with DomainBed's own
    training-domain validation selection, its algorithms, and notes on unequal trial counts."""
    if level == "pair":
        raise ValueError("--blocks pair exists only for single-source sweeps")
    reporting = import_domainbed(domainbed_root, "domainbed.lib.reporting")
    query = import_domainbed(domainbed_root, "domainbed.lib.query")
    model_selection = import_domainbed(domainbed_root, "domainbed.model_selection")
    db_datasets = import_domainbed(domainbed_root, "domainbed.datasets")
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"--multi_source_dir {input_dir} is not a folder")
    # DomainBed's reporting.load_records stops at the first damaged line; ours skips and lists it.
    records, damaged = records_of(load_runs(input_dir))
    grouped = reporting.get_grouped_records(query.Q(records))

    def env_names(dataset: str) -> Optional[List[str]]:
        if dataset not in db_datasets.DATASETS:
            return None
        return list(db_datasets.get_dataset_class(dataset).ENVIRONMENTS)

    table, algorithms, notes = multi_source_blocks(
        grouped, model_selection.IIDAccuracySelectionMethod.sweep_acc, env_names, level,
        algorithms, datasets, source=input_dir)
    return table, algorithms, notes + _damaged_note("multi-source", damaged)


def _damaged_note(setting: str, damaged: Sequence[str]) -> List[str]:
    if not damaged:
        return []
    return [f"{setting}: skipped {len(damaged)} damaged records or manifest entries: "
            + "; ".join(damaged)]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("significance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--single_source_dir", default=None)
    parser.add_argument("--multi_source_dir", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--algorithms", nargs="+", action=Distinct, default=None)
    parser.add_argument("--datasets", nargs="+", action=Distinct, default=None)
    parser.add_argument("--blocks", choices=BLOCK_LEVELS, default="domain")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--domainbed_root", default=None)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def _run(args: argparse.Namespace) -> int:
    """Write the diagrams and reports of the settings given."""
    settings = [(name, directory, fn) for name, directory, fn in (
        ("single_source", args.single_source_dir, single_source_table),
        ("multi_source", args.multi_source_dir, multi_source_table)) if directory]
    if not settings:
        raise ValueError("give --single_source_dir, --multi_source_dir or both")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}")
    stems = {name: Path(args.output_dir) / f"cd_{name}_{args.blocks}" for name, _, _ in settings}
    plan = plan_outputs([stem.with_suffix(s) for stem in stems.values() for s in (".txt", ".png")],
                        args.overwrite)
    outputs = []
    for name, directory, table_fn in settings:
        table, algorithms, notes = table_fn(directory, args.blocks, args.algorithms,
                                            args.datasets, args.domainbed_root)
        result = friedman_nemenyi(table, algorithms, args.alpha)
        title = f"{name.replace('_', '-')} DG, blocks: {args.blocks} ({directory})"
        text = format_result(result, title) + "".join(f"Note: {n}\n" for n in notes)
        outputs.append((stems[name], text, cd_diagram_png(result, f"{name.replace('_', '-')} DG, "
                                                                  f"blocks: {args.blocks}")))
    with folder_lock(args.output_dir):
        for stem, text, png in outputs:
            plan.write(stem.with_suffix(".txt"), text)
            plan.write(stem.with_suffix(".png"), png)
            print(text)
            print(f"wrote {stem}.txt and {stem}.png\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the diagrams and reports; 2 on bad input."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
