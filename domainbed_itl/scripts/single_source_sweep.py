"""Launch a single-source domain generalisation sweep (Gao et al., ICML 2022, Sec. 4.2).

See docs/single_source.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from ..bridge.algorithms import LOSS_ALGORITHMS
from ..bridge.domainbed_env import (find_domainbed_root, import_domainbed, with_pythonpath,
                                    with_quiet_loaders)
from ..bridge.launchers import (OUTPUT_LOG, Launcher, SubmititConfig, SubmititJobsFailed,
                                launch_jobs, launch_order, make_local_launcher,
                                make_submitit_launcher)
from ..bridge.hparams import check_sweep_losses, parse_hparams_flag
from ..bridge.sweep_estimate import print_plan
from ..files.job_progress import JobProgress, done_in, steps_done_in
from ..files.runlock import folder_lock
from ..files.running_jobs import running
from ..single_source.planning import single_source_args
from ..files.sweepfolder import PlannedJob, RunKey, last_error_line, update_manifest
from ..bridge.single_source_mixup import NAME as SINGLE_SOURCE_MIXUP, ONE_DOMAIN_NOTES
from ._cli import CommandParser, Distinct, command_main, integer

# DomainBed launchers that return once every job has ended, so that a job without `done` failed.
WAITING_LAUNCHERS = ("local", "multi_gpu")
SHRINK_FLAGS = ("--steps", "--sources", "--algorithms", "--datasets", "--n_hparams", "--n_trials")


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


_json_object.__name__ = "JSON object"  # argparse's error message names the type this way
# One --submitit_<field> flag per SubmititConfig field, typed as the field is.
SUBMITIT_FLAGS = {f.name: {"int": int, "Dict[str, Any]": _json_object}.get(str(f.type), str)
                  for f in dataclasses.fields(SubmititConfig) if str(f.type) != "Optional[bool]"}
SUBMITIT_SWITCHES = [f.name for f in dataclasses.fields(SubmititConfig) if str(f.type) == "Optional[bool]"]


class SweepInputError(ValueError):
    """A flag's value cannot make a sweep."""


def build_parser() -> argparse.ArgumentParser:
    """The command line: DomainBed's sweep flags plus ours (docs/single_source.md)."""
    parser = CommandParser(
        "single_source_sweep",
        description="Single-source DG sweep: DomainBed train runs with one training domain each.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", choices=["launch", "delete_incomplete"],
                        help="launch the jobs not launched yet, or delete the folders of jobs that "
                             "started, never finished and no longer run")
    parser.add_argument("--datasets", nargs="+", action=Distinct, default=None,
                        help="default: DomainBed's sweep datasets (all but Debug*)")
    parser.add_argument("--algorithms", nargs="+", action=Distinct, default=None,
                        help="default: every algorithm DomainBed knows")
    parser.add_argument("--n_hparams_from", type=integer, default=0,
                        help='the first hparams seed')
    parser.add_argument("--n_hparams", type=integer, default=20,
                        help='hparams seeds up to (excluded)')
    parser.add_argument("--n_trials", type=integer, default=3,
                        help='trials')
    parser.add_argument("--steps", type=integer, default=None,
                        help="training steps (None: each dataset's)")
    parser.add_argument("--checkpoint_freq", type=integer, default=None,
                        help='passed to train if given')
    parser.add_argument("--hparams", type=str, default=None, help="JSON dict of hparams to override")
    parser.add_argument("--holdout_fraction", type=float, default=0.2,
                        help="DomainBed's holdout fraction")
    parser.add_argument("--data_dir", type=str, required=True,
                        help="DomainBed's --data_dir")
    parser.add_argument("--output_dir", type=str, required=True,
                        help="the sweep's folder")
    parser.add_argument("--command_launcher", type=str, required=True,
                        help='a DomainBed launcher (local, multi_gpu, ...) or submitit')
    parser.add_argument("--sources", type=integer, nargs="+", action=Distinct, default=None,
                        help="source domain indices to run (default: every domain)")
    parser.add_argument("--seed", type=integer, default=0, help="seed of the shuffled launch order")
    parser.add_argument("--skip_confirmation", action="store_true",
                        help='launch or delete without a prompt')
    parser.add_argument("--no_progress", action="store_true",
                        help="no timed estimate before the launch and no progress bar (for logs)")
    parser.add_argument("--verbose", action="store_true",
                        help=f"DomainBed's own output on the screen (else, with the local "
                             f"launcher, in each job's folder, {OUTPUT_LOG})")
    parser.add_argument("--domainbed_root", type=str, default=None,
                        help="DomainBed checkout to import and to put on the jobs' PYTHONPATH")
    for name, kind in SUBMITIT_FLAGS.items():
        parser.add_argument(f"--submitit_{name}", type=kind, default=None,
                            help="with --command_launcher submitit: SubmititConfig." + name)
    for name in SUBMITIT_SWITCHES:
        parser.add_argument(f"--submitit_{name}", action=argparse.BooleanOptionalAction, default=None,
                            help="with --command_launcher submitit: SubmititConfig." + name)
    return parser


def validate(args: argparse.Namespace, datasets: ModuleType, algorithms: ModuleType,
             registry: Dict[str, Callable], checkout: Path) -> None:
    """Raise SweepInputError naming the first flag value that cannot make a sweep."""
    for dataset in args.datasets:
        if dataset not in datasets.DATASETS:
            raise SweepInputError(f"unknown dataset {dataset!r}; DomainBed knows: "
                                  f"{', '.join(datasets.DATASETS)}")
        n = datasets.num_environments(dataset)
        if n < 2:
            raise SweepInputError(f"dataset {dataset!r} has {n} domain; single-source DG needs at "
                                  f"least 2 (one source and a target)")
        for source in args.sources or ():
            if not 0 <= source < n:
                raise SweepInputError(f"--sources {source} is not a domain of {dataset!r}, whose "
                                      f"domains are 0..{n - 1}")
    for algorithm in args.algorithms:
        if algorithm in algorithms.ALGORITHMS:
            continue
        spec = LOSS_ALGORITHMS.get(algorithm)
        if spec is not None and spec.base not in algorithms.ALGORITHMS:
            raise SweepInputError(f"algorithm {algorithm!r} is domainbed-itl's {spec.loss} "
                                  f"inside {spec.base}, which the DomainBed checkout "
                                  f"{checkout} does not have")
        if algorithm in LOSS_ALGORITHMS or algorithm == SINGLE_SOURCE_MIXUP:
            raise SweepInputError(
                f"algorithm {algorithm!r} is domainbed-itl's, and the DomainBed checkout {checkout} "
                f"does not have our patches: python -m domainbed_itl.scripts.patch apply "
                f"--domainbed_root {checkout}")
        raise SweepInputError(f"unknown algorithm {algorithm!r}; DomainBed knows: "
                              f"{', '.join(algorithms.ALGORITHMS)}")
    if args.command_launcher != "submitit" and args.command_launcher not in registry:
        raise SweepInputError(f"unknown --command_launcher {args.command_launcher!r}; expected one "
                              f"of {', '.join(sorted(set(registry) | {'submitit'}))}")
    if args.command_launcher != "submitit":
        given = [f"--submitit_{n}" for n in [*SUBMITIT_FLAGS, *SUBMITIT_SWITCHES]
                 if getattr(args, f"submitit_{n}") is not None]
        if given:
            raise SweepInputError(f"{', '.join(given)} only apply with --command_launcher submitit, "
                                  f"not {args.command_launcher!r}")
    if args.n_trials < 1:
        raise SweepInputError(f"--n_trials must be at least 1, got {args.n_trials}")
    if not 0 <= args.n_hparams_from < args.n_hparams:
        raise SweepInputError(f"hparams seeds run from --n_hparams_from to --n_hparams - 1: need "
                              f"0 <= n_hparams_from < n_hparams, got {args.n_hparams_from} and "
                              f"{args.n_hparams}")
    for flag in ("steps", "checkpoint_freq"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SweepInputError(f"--{flag} must be at least 1, got {value}")
    if not 0 < args.holdout_fraction < 1:
        raise SweepInputError(f"--holdout_fraction must be between 0 and 1 (exclusive): the source "
                              f"needs both a training and a validation split; got {args.holdout_fraction}")
    check_losses(args)
    if not Path(args.data_dir).is_dir():
        raise SweepInputError(f"--data_dir {args.data_dir!r} is not a folder")


def check_losses(args: argparse.Namespace) -> None:
    """Raise SweepInputError for a --hparams that is not a JSON object, or under which one of our
    --algorithms would train with a loss that cannot train (see check_sweep_losses)."""
    try:
        overrides = parse_hparams_flag(args.hparams) if args.hparams is not None else {}
        check_sweep_losses(args.algorithms or (), args.datasets, overrides)
    except ValueError as error:
        raise SweepInputError(str(error)) from None


def make_launcher(args: argparse.Namespace, registry: Dict[str, Callable]) -> Launcher:
    """DomainBed's registered launcher, or for `submitit` one built from the --submitit_* flags."""
    if args.command_launcher == "local":
        return make_local_launcher(verbose=args.verbose)
    if args.command_launcher != "submitit":
        return registry[args.command_launcher]
    given = {n: getattr(args, f"submitit_{n}") for n in [*SUBMITIT_FLAGS, *SUBMITIT_SWITCHES]
             if getattr(args, f"submitit_{n}") is not None}
    try:
        config = dataclasses.replace(SubmititConfig.from_env(), **given)
    except ValueError as error:
        raise SweepInputError(str(error)) from None
    return make_submitit_launcher(config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; 1 when launched jobs failed, 2 on bad input."""
    return command_main(argv, build_parser, _main, interrupted=lambda args: "the running job was "
                        "stopped; `delete_incomplete` (it keeps jobs that still run), then "
                        "`launch`, both with the same flags, run it again and the rest")


def _main(args: argparse.Namespace) -> int:
    """Validate, plan, then launch or delete holding the output folder's lock; the exit status."""
    check_losses(args)  # before DomainBed is even imported
    sweep = import_domainbed(args.domainbed_root, "domainbed.scripts.sweep")
    datasets = import_domainbed(args.domainbed_root, "domainbed.datasets")
    algorithms = import_domainbed(args.domainbed_root, "domainbed.algorithms")
    misc = import_domainbed(args.domainbed_root, "domainbed.lib.misc")
    command_launchers = import_domainbed(args.domainbed_root, "domainbed.command_launchers")
    checkout = find_domainbed_root(args.domainbed_root)
    args.datasets = args.datasets or list(sweep.DATASETS)
    args.algorithms = args.algorithms or list(algorithms.ALGORITHMS)
    validate(args, datasets, algorithms, command_launchers.REGISTRY, checkout)
    for algorithm in args.algorithms:
        if algorithm in ONE_DOMAIN_NOTES:
            print(f"note: {ONE_DOMAIN_NOTES[algorithm]}.")
    launcher_fn = make_launcher(args, command_launchers.REGISTRY) if args.command == "launch" else None
    args_list = sweep.make_args_list(
        n_trials=args.n_trials, dataset_names=args.datasets, algorithms=args.algorithms,
        n_hparams_from=args.n_hparams_from, n_hparams=args.n_hparams, steps=args.steps,
        data_dir=args.data_dir, task="domain_generalization",
        holdout_fraction=args.holdout_fraction, single_test_envs=True, hparams=args.hparams)
    planned = single_source_args(args_list, datasets.num_environments, misc.seed_hash,
                                 args.sources, args.checkpoint_freq)
    nothing_there = args.command == "delete_incomplete" and not os.path.isdir(args.output_dir)
    with contextlib.nullcontext() if nothing_there else folder_lock(args.output_dir):
        return _run(args, sweep, planned, launcher_fn, checkout)


def _launch(args: argparse.Namespace, sweep: ModuleType, jobs: list, to_launch: list,
            launcher_fn: Launcher, checkout: Path) -> None:
    """Launch `to_launch` with DomainBed's Job.launch: first the plan and its estimate, then a
    progress bar over all the sweep's `jobs` while they run."""
    os.environ.update(with_quiet_loaders(with_pythonpath(checkout)))  # the jobs inherit it
    print(f"The jobs import DomainBed from {checkout} (first on their PYTHONPATH).")
    if to_launch:
        steps = f"{args.steps} steps" if args.steps else "each dataset's default steps"
        np.random.seed(args.seed)
        order = [job.train_args for job in launch_order(to_launch)]
        print_plan(len(to_launch), f"{' '.join(args.algorithms)} on {' '.join(args.datasets)} x "
                   f"{steps}, launcher {args.command_launcher}",
                   None if args.no_progress else order[0], checkout, SHRINK_FLAGS,
                   args.command_launcher, jobs=None if args.no_progress else order)
    np.random.seed(args.seed)
    folders = [job.output_dir for job in jobs]
    datasets = import_domainbed(args.domainbed_root, "domainbed.datasets")
    job_steps = [int(job.train_args.get("steps") or
                     datasets.get_dataset_class(job.train_args["dataset"]).N_STEPS) for job in jobs]
    quiet = args.command_launcher == "local" and not args.verbose
    with JobProgress(steps_done_in(folders, job_steps), sum(job_steps), desc="single-source jobs",
                     disable=args.no_progress or not to_launch, unit="step", interval=1.0,
                     jobs=(done_in(folders), len(jobs))):
        closing = launch_jobs(sweep.Job, to_launch, launcher_fn, quiet=quiet)
    print(closing, end="", flush=True)


def _run(args: argparse.Namespace, sweep: ModuleType, planned, launcher_fn: Optional[Launcher],
         checkout: Path) -> int:
    """Launch or delete the planned jobs, holding the output folder's lock; the exit status."""
    jobs = [(sweep.Job(train_args, args.output_dir), source) for train_args, source in planned]

    for job, source in jobs:
        print(f"{job} source={source}")
    states = [job.state for job, _ in jobs]
    print("{} jobs: {} done, {} incomplete, {} not launched.".format(
        len(jobs), states.count(sweep.Job.DONE), states.count(sweep.Job.INCOMPLETE),
        states.count(sweep.Job.NOT_LAUNCHED)))

    if args.command == "launch":
        to_launch = [job for job, _ in jobs if job.state == sweep.Job.NOT_LAUNCHED]
        print(f"About to launch {len(to_launch)} jobs.")
        if not args.skip_confirmation:
            sweep.ask_for_confirmation()
        manifest = [PlannedJob(Path(job.output_dir).name,
                               RunKey(a["dataset"], a["algorithm"], source, a["trial_seed"],
                                      a["hparams_seed"]), len(a["test_envs"]) + 1)
                    for (job, source), (a, _) in zip(jobs, planned)]
        try:
            update_manifest(args.output_dir, manifest)
        except ValueError as error:  # a damaged manifest: never replaced with fewer jobs
            print(f"error: {error}", file=sys.stderr)
            return 2
        try:
            _launch(args, sweep, [job for job, _ in jobs], to_launch, launcher_fn, checkout)
        except SubmititJobsFailed as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        if args.command_launcher in WAITING_LAUNCHERS:
            keys = {job.output_dir: entry.key for (job, _), entry in zip(jobs, manifest)}
            failed = [job for job in to_launch
                      if not os.path.exists(os.path.join(job.output_dir, "done"))]
            if failed:
                print(f"error: {len(failed)} of {len(to_launch)} launched jobs failed (no `done` "
                      "marker); `delete_incomplete` then `launch` runs them again:", file=sys.stderr)
                for job in failed:
                    print(f"  {keys[job.output_dir]}: {job.output_dir}: "
                          f"{last_error_line(job.output_dir) or 'no err.txt'}",
                          file=sys.stderr)
                return 1
    else:
        to_delete = [job for job, _ in jobs if job.state == sweep.Job.INCOMPLETE]
        busy = [(job, running(job.output_dir)) for job in to_delete if running(job.output_dir)]
        for job, why in busy:
            print(f"kept: {job.output_dir} still runs ({why}); it is deleted once it ended")
        to_delete = [job for job in to_delete if running(job.output_dir) is None]
        print(f"About to delete {len(to_delete)} jobs.")
        if not args.skip_confirmation:
            sweep.ask_for_confirmation()
        sweep.Job.delete(to_delete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
