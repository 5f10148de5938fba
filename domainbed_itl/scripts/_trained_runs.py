"""What the analysis scripts on trained DomainBed models share: their flags and the runs they read."""

from __future__ import annotations

import argparse
import os
from typing import Iterator, List, Tuple

from ..bridge.trained_models import Run, Splits, TrainedModel, find_runs, load_model, rebuild_splits


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The inputs, data, device and output flags of every analysis of trained models."""
    parser.add_argument("inputs", nargs="+",
                        help="DomainBed run folders, sweep folders (searched for runs) or model .pkl files")
    parser.add_argument("--data_dir", default=None,
                        help="DomainBed's --data_dir (default: each run's own)")
    parser.add_argument("--domainbed_root", default=os.environ.get("DOMAINBED_ROOT"),
                        help="DomainBed checkout (default: $DOMAINBED_ROOT, else `import domainbed`)")
    parser.add_argument("--algorithms", nargs="+", default=None,
                        help="only runs of these algorithms (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--batch_size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def runs_of(args: argparse.Namespace) -> List[Run]:
    """The runs named on the command line (RunError when there are none)."""
    return find_runs(args.inputs)


def models(args: argparse.Namespace, runs: List[Run]) -> Iterator[Tuple[Run, TrainedModel, Splits]]:
    """(run, model at its final checkpoint, its splits) for each selected run, in order."""
    for run in runs:
        model = load_model(run.final.path, args.domainbed_root, args.device)
        if args.algorithms is not None and model.name not in args.algorithms:
            continue
        splits = rebuild_splits(model.args, model.hparams, args.data_dir, args.domainbed_root)
        yield run, model, splits


def describe_run(run: Run, model: TrainedModel) -> dict:
    """The identifying fields of a run in the analyses' outputs."""
    return {"run": str(run.folder), "algorithm": model.name, "label": model.label,
            "dataset": model.args["dataset"], "test_envs": model.test_envs,
            "trial_seed": model.args.get("trial_seed"), "hparams_seed": model.args.get("hparams_seed")}
