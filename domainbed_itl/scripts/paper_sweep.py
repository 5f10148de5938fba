"""List, show and run the paper's experiments (sweeps/, see domainbed_itl.experiments.paper).

See docs/paper_experiments.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from ..bridge.domainbed_env import find_domainbed_root, with_pythonpath, with_quiet_loaders
from ..experiments.paper import (ONE_JOB_RUNNERS, Experiment, Placeholders, Stage, available,
                                 build_stage_commands, count_jobs, count_stage_jobs, estimate_cost,
                                 format_command, load_experiment, num_environments, referenced_stages,
                                 stage_args, stage_output_dir, stage_references)
from ..bridge.hparams import check_sweep_losses
from ..bridge.patching import APPLIED, status
from ..bridge.sweep_estimate import print_plan
from ..files.job_progress import JobProgress, done_under
from ..files.runfolder import CHECKPOINT
from ..files.runlock import folder_lock
from ..files.sweepfolder import unfinished_jobs
from ._cli import CommandParser, command_main

SWEEP_LAUNCHERS = ("local", "dummy", "multi_gpu", "submitit")
# Launchers that return once every job has ended, so that a job folder without `done` failed.
WAITING_LAUNCHERS = ("local", "multi_gpu")
# Meta-training and loss evaluation run in one process: here, or as one submitit job.
ONE_JOB_LAUNCHERS = ("local", "submitit")
ONE_JOB_LABELS = {"meta_train": "meta-training", "evaluate_loss": "loss evaluation"}
SHRINK_FLAGS = ("--reduced", "a copy of the definition with fewer datasets, algorithms, hparams "
                "seeds, trials or steps (--sweeps_dir)")


class PaperSweepError(RuntimeError):
    """The request cannot be carried out; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("paper_sweep", description=__doc__.split("\n\n")[0])
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
            sub.add_argument("--no_progress", action="store_true",
                             help="no progress bar and no timed estimate (for logs)")
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


def check_losses(experiment: Experiment, reduced: bool, given: Optional[Placeholders] = None) -> None:
    """Raise PaperSweepError if one of the variant's algorithms would train with a loss that
    cannot train under its `hparams`. Without `given`, hparams naming an earlier stage's output
    are left out (that file does not exist yet); with it, they are checked as resolved."""
    for stage in experiment.stages:
        _check_stage_losses(experiment, stage, reduced, given)


def _check_stage_losses(experiment: Experiment, stage: Stage, reduced: bool,
                        given: Optional[Placeholders]) -> None:
    if stage.runner_name in ONE_JOB_RUNNERS:
        return
    args = stage.variant(reduced).args if given is None else stage_args(experiment, stage, reduced, given)
    hparams = {k: v for k, v in args.get("hparams", {}).items()
               if given is not None or not stage_references(v)}
    try:
        check_sweep_losses(args["algorithms"], args["datasets"], hparams)
    except ValueError as error:
        where = f" [stage {stage.name}]" if stage.name else ""
        raise PaperSweepError(f"{experiment.path}{where}: {error}") from None


def first_job(args: Dict[str, Any], runner_name: str, data_dir: str) -> Dict[str, Any]:
    """DomainBed's train arguments of a sweep stage's first job (its first dataset, algorithm,
    test environment or source, hparams seed and trial), from the stage's flags `args`."""
    dataset = args["datasets"][0]
    if runner_name == "single_source_sweep":
        source = (args.get("sources") or [0])[0]
        test_envs = [e for e in range(num_environments(dataset)) if e != source]
    else:
        test_envs = [0]
    job = {"dataset": dataset, "algorithm": args["algorithms"][0], "test_envs": test_envs,
           "hparams_seed": args.get("n_hparams_from", 0), "trial_seed": 0, "seed": 0,
           "data_dir": data_dir, "holdout_fraction": args.get("holdout_fraction", 0.2),
           "task": "domain_generalization"}
    if args.get("hparams"):
        job["hparams"] = json.dumps(args["hparams"], sort_keys=True)
    job.update({k: args[k] for k in ("steps", "checkpoint_freq") if args.get(k) is not None})
    return job


def _jobs_done(experiment: Experiment, reduced: bool, given: Placeholders,
               finished: Set[Optional[str]]) -> Callable[[], int]:
    """A counter of the experiment's jobs done: the `finished` one-job stages, and per sweep
    stage its job folders with `done` (at most the stage's job count: a folder may be shared)."""
    sweeps = [(done_under(stage_output_dir(given.output_dir, stage.name)),
               sum(count_stage_jobs(stage, reduced).values()))
              for stage in experiment.stages if stage.runner_name not in ONE_JOB_RUNNERS]
    return lambda: len(finished) + sum(min(count(), n) for count, n in sweeps)


def _print_stage_plan(experiment: Experiment, stage: Stage, reduced: bool, given: Placeholders,
                      checkout: Path, estimate: bool) -> None:
    args = stage_args(experiment, stage, reduced, given)
    n = sum(count_stage_jobs(stage, reduced).values())
    steps = f"{args['steps']} steps" if args.get("steps") else "each dataset's default steps"
    where = f"stage {stage.name}: " if stage.name else ""
    print_plan(n, f"{where}{' '.join(args['algorithms'])} on {' '.join(args['datasets'])} x {steps}",
               first_job(args, stage.runner_name, given.data_dir) if estimate else None, checkout,
               SHRINK_FLAGS, given.command_launcher)


def run(experiment: Experiment, reduced: bool, given: Placeholders, dry_run: bool,
        progress: bool = True) -> int:
    """Run (or with `dry_run` print) the variant's commands; the exit status."""
    check_losses(experiment, reduced)
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
    env = with_quiet_loaders(with_pythonpath(checkout))
    Path(given.output_dir).mkdir(parents=True, exist_ok=True)
    finished: Set[Optional[str]] = set()
    with JobProgress(_jobs_done(experiment, reduced, given, finished),
                     sum(count_jobs(experiment, reduced).values()), desc=f"{experiment.name} jobs",
                     disable=not progress) as bar:
        for stage in experiment.stages:
            commands = build_stage_commands(experiment, stage, reduced, given, python=sys.executable)
            commands[0] = resume_if_started(commands[0])
            stage_env = dict(env, DOMAINBED_SUBMITIT_WAIT="1") if stage.name in needed else env
            folder = stage_output_dir(given.output_dir, stage.name)
            if stage.runner_name not in ONE_JOB_RUNNERS:
                _check_stage_losses(experiment, stage, reduced, given)  # with earlier stages' files
                _print_stage_plan(experiment, stage, reduced, given, checkout, progress)
            if stage.runner_name == "single_source_sweep":  # this command shows the progress
                commands[0].append("--no_progress")
            if stage.runner_name == "domainbed_sweep":  # DomainBed's sweep takes no lock itself
                with folder_lock(folder):
                    code = _run_commands(stage, given, folder, commands, stage_env)
            else:
                code = _run_commands(stage, given, folder, commands, stage_env)
            if code != 0:
                return code
            if stage.runner_name in ONE_JOB_RUNNERS:
                finished.add(stage.name)
            bar.poll()
    return 0


def resume_if_started(tokens: List[str]) -> List[str]:
    """The stage's run, without --resume while its --output_dir holds no checkpoint: the first
    run of a stage starts it, a later one continues it (a command refuses --resume where there
    is no run to continue)."""
    if "--resume" not in tokens or "--output_dir" not in tokens:
        return tokens
    folder = Path(tokens[tokens.index("--output_dir") + 1])
    return tokens if (folder / CHECKPOINT).is_file() else [t for t in tokens if t != "--resume"]


def _run_commands(stage: Stage, given: Placeholders, folder: str, commands: List[List[str]],
                  env: Dict[str, str]) -> int:
    """Run one stage: the sweep, then (after a sweep whose jobs ran, failed or not) its collection."""
    failed = None
    for tokens in commands:
        print(f"\n$ {format_command(tokens)}", flush=True)
        if stage.runner_name in ONE_JOB_RUNNERS and given.command_launcher == "submitit":
            from ..bridge.launchers import (
                SubmititConfig,
                SubmititJobsFailed,
                make_submitit_launcher,
            )

            try:
                config = SubmititConfig.from_env(env)
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
        if tokens is commands[0] and stage.runner.collect_module:
            unfinished = (unfinished_jobs(folder)
                          if stage.runner_name == "domainbed_sweep"
                          and given.command_launcher in WAITING_LAUNCHERS else [])
            if returncode == 1 or (returncode == 0 and unfinished):
                # Jobs failed: say which, and still collect what the others produced.
                failed = (f"{len(unfinished)} job folders in {folder} have no `done` "
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
    return command_main(argv, build_parser, _main, expected=(PaperSweepError,),
                        interrupted=lambda args: "run the same command again to continue: finished "
                                                 "stages and jobs are kept")


def _main(args: argparse.Namespace) -> int:
    """List, show or run; the exit status."""
    sweeps_dir = args.sweeps_dir
    if args.command == "list":
        print(list_experiments(sweeps_dir))
        return 0
    experiment = load_experiment(args.name, sweeps_dir)
    launcher = _launcher(experiment, args.reduced, args.command_launcher)
    given = Placeholders(args.data_dir, args.output_dir, launcher, args.domainbed_root)
    if args.command == "show":
        print(describe(experiment, args.reduced, given))
        return 0
    return run(experiment, args.reduced, given, args.dry_run, not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
