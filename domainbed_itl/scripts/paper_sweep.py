"""List, show and run the paper's experiments (sweeps/, see domainbed_itl.experiments.paper).

    python -m domainbed_itl.scripts.paper_sweep list
    python -m domainbed_itl.scripts.paper_sweep show table2_multi_source [--reduced]
    python -m domainbed_itl.scripts.paper_sweep run table2_multi_source --reduced \\
        --data_dir ./data --output_dir ./runs/table2 --domainbed_root ../DomainBed [--dry_run]

`show` prints the commands (with <placeholders> for what is not given), the number of jobs per
dataset and the cost estimate with its basis. `run` runs the commands one after the other, with
the DomainBed checkout on PYTHONPATH: the sweep (DomainBed's, or ours for single-source), then
the collection of its results; `--dry_run` prints them only. The command launcher defaults to
`submitit` (configured by DOMAINBED_SUBMITIT_* variables, see domainbed_itl.experiments.launchers) for the
paper scale, and to DomainBed's serial `local` for the reduced variant. Exit status: 0 done,
1 a command or a job failed, 2 bad input.

`run` checks the losses of the definition's algorithms under its `hparams` before anything
starts (domainbed_itl.hparams.check_sweep_losses). DomainBed's own sweep exits 0 when its jobs
fail, so after a DomainBed sweep with a launcher that waits for its jobs (`local`,
`multi_gpu`) the job folders without DomainBed's `done` marker are listed with the last line
of their `err.txt`; the collection still runs, then `run` exits with status 1. While it runs a
DomainBed sweep, `run` holds the output folder's lock (domainbed_itl.runlock); our own runners
take it themselves.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..domainbed_env import DomainBedNotFound, find_domainbed_root, with_pythonpath
from ..experiments.paper import (Experiment, Placeholders, SweepDefinitionError, available,
                                 build_commands, count_jobs, estimate_cost, format_command,
                                 load_experiment)
from ..hparams import check_sweep_losses
from ..patching import APPLIED, PatchError, status
from ..runlock import FolderLocked, folder_lock
from ..single_source.runs import unfinished_jobs

SWEEP_LAUNCHERS = ("local", "dummy", "multi_gpu", "submitit")
# Launchers that return once every job has ended, so that a job folder without `done` failed.
WAITING_LAUNCHERS = ("local", "multi_gpu")
META_TRAIN_LAUNCHERS = ("local", "submitit")


class PaperSweepError(RuntimeError):
    """The request cannot be carried out; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="python -m domainbed_itl.scripts.paper_sweep",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps_dir", default=None, type=Path,
                        help="folder of the *.toml definitions (default: the sweeps/ shipped with "
                             "domainbed-itl)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,show,run}")
    commands.add_parser("list", help="the definitions, their jobs and costs")
    for name, help_text in (("show", "print a definition's commands, jobs and cost"),
                            ("run", "run a definition's commands")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("name", help="a definition, e.g. table2_multi_source (see `list`)")
        sub.add_argument("--reduced", action="store_true",
                         help="the reduced CPU variant instead of the paper scale")
        required = name == "run"
        sub.add_argument("--data_dir", required=required, default=None)
        sub.add_argument("--output_dir", required=required, default=None)
        sub.add_argument("--command_launcher", default=None,
                         help="sweeps: local, dummy, multi_gpu or submitit; meta-training: local "
                              "(in this process) or submitit (default: submitit for the paper "
                              "scale, local for --reduced)")
        sub.add_argument("--domainbed_root", default=os.environ.get("DOMAINBED_ROOT"),
                         help="the patched DomainBed checkout (default: $DOMAINBED_ROOT, else "
                              "`import domainbed`)")
        if name == "run":
            sub.add_argument("--dry_run", action="store_true", help="print the commands only")
    return parser


def _launcher(experiment: Experiment, reduced: bool, requested: Optional[str]) -> str:
    choices = META_TRAIN_LAUNCHERS if experiment.runner_name == "meta_train" else SWEEP_LAUNCHERS
    launcher = requested or ("local" if reduced else "submitit")
    if launcher not in choices:
        raise PaperSweepError(f"--command_launcher {launcher!r} is not one of {', '.join(choices)} "
                              f"(runner {experiment.runner_name})")
    return launcher


def describe(experiment: Experiment, reduced: bool, given: Placeholders) -> str:
    """The text of `show`: what the experiment is, its commands, jobs and cost."""
    variant = experiment.variant(reduced)
    jobs = count_jobs(experiment, reduced)
    total, unit = estimate_cost(experiment, reduced)
    lines = [f"{experiment.name} ({variant.name} scale): {experiment.title}",
             f"reproduces: {experiment.reproduces}", f"definition: {experiment.path}"]
    if experiment.notes.strip():
        lines += ["", *experiment.notes.strip().splitlines()]
    lines += ["", "commands:"]
    lines += [f"  {format_command(c)}" for c in build_commands(experiment, reduced, given)]
    lines += ["", f"jobs: {sum(jobs.values())}"]
    for dataset, n in jobs.items():
        if dataset is not None:
            lines.append(f"  {dataset}: {n} jobs x {variant.cost.of(dataset):g} {unit} = "
                         f"{n * variant.cost.of(dataset):g} {unit}")
    lines += [f"estimated cost: {total:g} {unit}", f"  per job: {variant.cost.basis}"]
    return "\n".join(lines)


def list_experiments(sweeps_dir: Optional[Path] = None) -> str:
    """The text of `list`: one line per definition."""
    rows = [("name", "reproduces", "paper jobs", "paper cost", "reduced jobs", "reduced cost")]
    for name in available(sweeps_dir):
        experiment = load_experiment(name, sweeps_dir)
        row = [name, experiment.reproduces]
        for reduced in (False, True):
            total, unit = estimate_cost(experiment, reduced)
            row += [str(sum(count_jobs(experiment, reduced).values())), f"{total:g} {unit}"]
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _domainbed_checkout(root: Optional[str], need_patches: bool) -> Path:
    """The DomainBed checkout to run with (`root`, else the importable one), patched if need be."""
    checkout = find_domainbed_root(root)
    states = status(checkout) if need_patches else []
    if any(state.kind != APPLIED for state in states):
        raise PaperSweepError(
            f"the DomainBed checkout {checkout} does not carry domainbed-itl's patches "
            f"({', '.join(map(str, states))}); run `python -m domainbed_itl.scripts.patch apply "
            f"--domainbed_root {checkout}` first")
    return checkout


def _check_runner_installed(experiment: Experiment) -> None:
    module = experiment.runner.module
    if module.startswith("domainbed_itl.") and importlib.util.find_spec(module) is None:
        raise PaperSweepError(f"{experiment.name} needs {module}, which this installation of "
                              "domainbed-itl does not have")


def check_losses(experiment: Experiment, reduced: bool) -> None:
    """Raise PaperSweepError if one of the variant's algorithms would train with a loss that
    cannot train under its `hparams`."""
    if experiment.runner_name == "meta_train":
        return
    args = experiment.variant(reduced).args
    try:
        check_sweep_losses(args["algorithms"], args["datasets"], args.get("hparams", {}))
    except ValueError as error:
        raise PaperSweepError(f"{experiment.path}: {error}") from None


def run(experiment: Experiment, reduced: bool, given: Placeholders, dry_run: bool) -> int:
    """Run (or with `dry_run` print) the variant's commands; the exit status."""
    commands = build_commands(experiment, reduced, given, python=sys.executable)
    check_losses(experiment, reduced)
    print(describe(experiment, reduced, given), flush=True)
    if dry_run:
        return 0
    _check_runner_installed(experiment)
    if not Path(given.data_dir).is_dir():
        raise PaperSweepError(f"--data_dir {given.data_dir} is not a folder")
    checkout = _domainbed_checkout(given.domainbed_root,
                                   need_patches=experiment.runner_name != "meta_train")
    env = with_pythonpath(checkout)
    Path(given.output_dir).mkdir(parents=True, exist_ok=True)
    if experiment.runner_name == "domainbed_sweep":  # DomainBed's sweep takes no lock itself
        with folder_lock(given.output_dir):
            return _run_commands(experiment, given, commands, env)
    return _run_commands(experiment, given, commands, env)


def _run_commands(experiment: Experiment, given: Placeholders, commands: List[List[str]],
                  env: Dict[str, str]) -> int:
    """Run the sweep, then (after a sweep whose jobs ran, failed or not) its collection."""
    failed = None
    for tokens in commands:
        print(f"\n$ {format_command(tokens)}", flush=True)
        if experiment.runner_name == "meta_train" and given.command_launcher == "submitit":
            from ..experiments.launchers import (
                SubmititConfig,
                SubmititJobsFailed,
                make_submitit_launcher,
            )

            try:
                config = SubmititConfig.from_env()
            except ValueError as error:
                raise PaperSweepError(str(error)) from None
            command = f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} {format_command(tokens)}"
            try:
                make_submitit_launcher(config)([command])
            except SubmititJobsFailed as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
            continue
        returncode = subprocess.run(tokens, env=env).returncode
        if tokens is commands[0] and experiment.runner.collect_module:
            unfinished = (unfinished_jobs(given.output_dir)
                          if experiment.runner_name == "domainbed_sweep"
                          and given.command_launcher in WAITING_LAUNCHERS else [])
            if returncode == 1 or (returncode == 0 and unfinished):
                # Jobs failed: say which, and still collect what the others produced.
                failed = (f"{len(unfinished)} job folders in {given.output_dir} have no `done` "
                          "marker (DomainBed's `sweep delete_incomplete` then `sweep launch` "
                          "runs them again):\n" + "\n".join(f"  {u}" for u in unfinished)
                          if unfinished else "the sweep above reported failed jobs")
                continue
        if returncode != 0:
            print(f"error: the command above failed with exit status {returncode}", file=sys.stderr)
            return 1
    if failed is not None:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    sweeps_dir = args.sweeps_dir
    try:
        if args.command == "list":
            print(list_experiments(sweeps_dir))
            return 0
        experiment = load_experiment(args.name, sweeps_dir)
        launcher = _launcher(experiment, args.reduced, args.command_launcher)
        given = Placeholders(args.data_dir, args.output_dir, launcher, args.domainbed_root)
        if args.command == "show":
            print(describe(experiment, args.reduced, given))
            return 0
        return run(experiment, args.reduced, given, args.dry_run)
    except (SweepDefinitionError, PaperSweepError, PatchError, DomainBedNotFound,
            FolderLocked) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
