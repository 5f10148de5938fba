"""List, show and run the paper's experiments (sweeps/, see domainbed_itl.experiments.paper).

    python -m domainbed_itl.scripts.paper_sweep list
    python -m domainbed_itl.scripts.paper_sweep show table2_multi_source [--reduced]
    python -m domainbed_itl.scripts.paper_sweep run table2_multi_source --reduced \\
        --data_dir ./data --output_dir ./runs/table2 --domainbed_root ../DomainBed [--dry_run]

`show` prints the commands (with <placeholders> for what is not given), the number of jobs per
dataset and the cost estimate with its basis. `run` runs the commands one after the other, with
the DomainBed checkout on PYTHONPATH: the sweep (DomainBed's, or ours for single-source), then
the collection of its results; an experiment of several stages (e.g. meta-training, then a
sweep with the learned loss) runs them in order, each in <output_dir>/<stage>, and stops at the
first that fails; `--dry_run` prints them only. The command launcher defaults to
`submitit` (configured by DOMAINBED_SUBMITIT_* variables, see domainbed_itl.experiments.launchers)
for the paper scale, and to DomainBed's serial `local` for the reduced variant. Exit status:
0 done, 1 a command failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..domainbed_env import DomainBedNotFound, find_domainbed_root, with_pythonpath
from ..experiments.paper import (ONE_JOB_RUNNERS, Experiment, Placeholders, SweepDefinitionError,
                                 available, build_stage_commands, count_jobs, count_stage_jobs,
                                 estimate_cost, format_command, load_experiment, referenced_stages)
from ..patching import APPLIED, PatchError, status

SWEEP_LAUNCHERS = ("local", "dummy", "multi_gpu", "submitit")
# Meta-training and loss evaluation run in one process: here, or as one submitit job.
ONE_JOB_LAUNCHERS = ("local", "submitit")
ONE_JOB_LABELS = {"meta_train": "meta-training", "evaluate_loss": "loss evaluation"}


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
                         help="sweeps: local, dummy, multi_gpu or submitit; meta-training and "
                              "loss evaluation: local (in this process) or submitit (default: "
                              "submitit for the paper scale, local for --reduced)")
        sub.add_argument("--domainbed_root", default=os.environ.get("DOMAINBED_ROOT"),
                         help="the patched DomainBed checkout (default: $DOMAINBED_ROOT, else "
                              "`import domainbed`)")
        if name == "run":
            sub.add_argument("--dry_run", action="store_true", help="print the commands only")
    return parser


def _launcher(experiment: Experiment, reduced: bool, requested: Optional[str]) -> str:
    runners = list(dict.fromkeys(stage.runner_name for stage in experiment.stages))
    choices = [c for c in SWEEP_LAUNCHERS if all(
        c in (ONE_JOB_LAUNCHERS if runner in ONE_JOB_RUNNERS else SWEEP_LAUNCHERS) for runner in runners)]
    launcher = requested or ("local" if reduced else "submitit")
    if launcher not in choices:
        raise PaperSweepError(f"--command_launcher {launcher!r} is not one of {', '.join(choices)} "
                              f"(runner{'s' if len(runners) > 1 else ''} {', '.join(runners)})")
    return launcher


def describe(experiment: Experiment, reduced: bool, given: Placeholders) -> str:
    """The text of `show`: what the experiment is, its commands, jobs and cost."""
    jobs = count_jobs(experiment, reduced)
    total, unit = estimate_cost(experiment, reduced)
    lines = [f"{experiment.name} ({'reduced' if reduced else 'paper'} scale): {experiment.title}",
             f"reproduces: {experiment.reproduces}", f"definition: {experiment.path}"]
    if experiment.notes.strip():
        lines += ["", *experiment.notes.strip().splitlines()]
    staged = len(experiment.stages) > 1
    if staged:
        lines += ["", f"stages, run in this order, each in <output_dir>/<stage>: "
                      f"{', '.join(str(s.name) for s in experiment.stages)}"]
    lines += ["", "commands:"]
    for stage in experiment.stages:
        if staged:
            lines.append(f"  # stage {stage.name} ({stage.runner_name})")
        lines += [f"  {format_command(c)}" for c in build_stage_commands(experiment, stage, reduced, given)]
    lines += ["", f"jobs: {sum(jobs.values())}"]
    for stage in experiment.stages:
        cost = stage.variant(reduced).cost
        prefix = f"stage {stage.name}: " if staged else ""
        for dataset, n in count_stage_jobs(stage, reduced).items():
            if dataset is not None or staged:
                what = dataset or ONE_JOB_LABELS[stage.runner_name]
                lines.append(f"  {prefix}{what}: {n} job{'s' * (n != 1)} x "
                             f"{cost.of(dataset):g} {unit} = {n * cost.of(dataset):g} {unit}")
    lines.append(f"estimated cost: {total:g} {unit}")
    for stage in experiment.stages:
        lines.append(f"  per job{f' ({stage.name})' if staged else ''}: {stage.variant(reduced).cost.basis}")
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
    for stage in experiment.stages:
        module = stage.runner.module
        if module.startswith("domainbed_itl.") and importlib.util.find_spec(module) is None:
            raise PaperSweepError(f"{experiment.name} needs {module}, which this installation of "
                                  "domainbed-itl does not have")


def run(experiment: Experiment, reduced: bool, given: Placeholders, dry_run: bool) -> int:
    """Run (or with `dry_run` print) the variant's commands; the exit status."""
    print(describe(experiment, reduced, given), flush=True)
    if dry_run:
        return 0
    _check_runner_installed(experiment)
    needed = referenced_stages(experiment)
    if given.command_launcher == "submitit" and needed and os.environ.get("DOMAINBED_SUBMITIT_WAIT") == "0":
        raise PaperSweepError(f"DOMAINBED_SUBMITIT_WAIT=0, but later stages of {experiment.name} need "
                              f"the outputs of {', '.join(sorted(needed))}: unset it, or set it to 1")
    if not Path(given.data_dir).is_dir():
        raise PaperSweepError(f"--data_dir {given.data_dir} is not a folder")
    checkout = _domainbed_checkout(given.domainbed_root, need_patches=any(
        stage.runner_name not in ONE_JOB_RUNNERS for stage in experiment.stages))
    env = with_pythonpath(checkout)
    Path(given.output_dir).mkdir(parents=True, exist_ok=True)
    staged = [(stage, tokens) for stage in experiment.stages
              for tokens in build_stage_commands(experiment, stage, reduced, given, python=sys.executable)]
    for stage, tokens in staged:
        print(f"\n$ {format_command(tokens)}", flush=True)
        stage_env = dict(env, DOMAINBED_SUBMITIT_WAIT="1") if stage.name in needed else env
        if stage.runner_name in ONE_JOB_RUNNERS and given.command_launcher == "submitit":
            from ..experiments.launchers import (
                SubmititConfig,
                SubmititJobsFailed,
                make_submitit_launcher,
            )

            try:
                config = SubmititConfig.from_env(stage_env)
            except ValueError as error:
                raise PaperSweepError(str(error)) from None
            command = f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} {format_command(tokens)}"
            try:
                make_submitit_launcher(config)([command])
            except SubmititJobsFailed as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
            continue
        returncode = subprocess.run(tokens, env=stage_env).returncode
        if returncode != 0:
            print(f"error: the command above failed with exit status {returncode}", file=sys.stderr)
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
    except (SweepDefinitionError, PaperSweepError, PatchError, DomainBedNotFound) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
