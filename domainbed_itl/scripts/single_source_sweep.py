"""Launch a single-source domain generalisation sweep (Gao et al., ICML 2022, Sec. 4.2).

    python -m domainbed_itl.scripts.single_source_sweep launch \\
        --domainbed_root ../DomainBed --datasets PACS VLCS --algorithms ERM ITL \\
        --data_dir ./domainbed/data --output_dir ./sweeps/single_source \\
        --command_launcher local
    python -m domainbed_itl.scripts.single_source_sweep delete_incomplete ...same flags...

For every dataset, algorithm, trial, hparams seed and source domain s, one run of DomainBed's own
`train` with `--test_envs` = every domain except s. The sweep is DomainBed's: the arguments come
from its `make_args_list(..., single_test_envs=True)` with each test env [s] replaced by its
complement (and the seed re-derived from the new test envs with DomainBed's `seed_hash`), the jobs
are its `Job`s (same hashed folders, same `done` markers), launched by `Job.launch` through
`command_launchers.REGISTRY`. So DomainBed's tools read the outputs, and running the same command
again launches only the jobs that have no folder yet; `delete_incomplete` removes the folders of
jobs that started but never wrote `done`, after which `launch` re-runs them.

The flags are those of DomainBed's sweep, plus:

* `--domainbed_root`: the DomainBed checkout to import (else `domainbed` must be importable).
  The jobs run `python -m domainbed.scripts.train`; this launcher puts the checkout it imported
  first on PYTHONPATH in its own environment, which the jobs inherit (local and multi_gpu
  launchers, submitit's local executor, and Slurm, which exports the submitting environment by
  default). DomainBed itself is not changed. For our algorithms (ITL, ERM_Focal, ...) the
  checkout must carry our patches: `python -m domainbed_itl.scripts.patch apply`.
* `--sources`: only these source domains (default: all of them).
* `--checkpoint_freq`: passed to train (changes the job hashes; by default it is not passed).
* `--submitit_*`: the settings of `--command_launcher submitit` (see domainbed_itl.bridge.launchers;
  a flag overrides the matching DOMAINBED_SUBMITIT_* variable).
* `--seed`: seeds the shuffled launch order (DomainBed's sweep accepts `--seed` and ignores it).
* `--no_progress`: no timed estimate and no progress bar (below).

Before it launches, `launch` prints the plan (jobs x steps) and, with the `local` launcher on a
machine without a GPU, an estimate of how long the jobs take from a few training steps of the
first one timed here (domainbed_itl.bridge.sweep_estimate); while they run, a progress bar counts
the jobs that wrote DomainBed's `done` marker and shows the time left. The jobs run with a
warning filter for torch's note on DomainBed's 8 data-loader workers per loader.

Besides DomainBed's folders, `launch` keeps `single_source_sweep.json` in the output folder: the
planned jobs, so that `collect_single_source` can name runs whose folders are missing or empty.

Nothing starts on input that cannot work: the losses of our algorithms under `--hparams` are
checked before anything is launched (domainbed_itl.bridge.hparams.check_sweep_losses), and the output
folder has one writer (domainbed_itl.files.runlock): a second `launch` or `delete_incomplete` on it is
refused while the first runs. With a launcher that waits for its jobs (`local`, `multi_gpu`,
`submitit` unless it leaves Slurm jobs queued), jobs that end without DomainBed's `done` marker
are listed with the last line of their `err.txt`, and the command exits with status 1.
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
from ..bridge.launchers import (Launcher, SubmititConfig, SubmititJobsFailed,
                                     make_submitit_launcher)
from ..bridge.hparams import check_sweep_losses, parse_hparams_flag
from ..bridge.sweep_estimate import print_plan
from ..files.job_progress import JobProgress, done_in
from ..files.runlock import folder_lock
from ..single_source.planning import single_source_args
from ..files.sweepfolder import PlannedJob, RunKey, last_error_line, update_manifest
from ..bridge.single_source_mixup import NAME as SINGLE_SOURCE_MIXUP, ONE_DOMAIN_NOTES
from ._cli import Distinct, integer, run_command

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
    """The command line: DomainBed's sweep flags plus ours (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Single-source DG sweep: DomainBed train runs with one training domain each.")
    parser.add_argument("command", choices=["launch", "delete_incomplete"])
    parser.add_argument("--datasets", nargs="+", action=Distinct, default=None,
                        help="default: DomainBed's sweep datasets (all but Debug*)")
    parser.add_argument("--algorithms", nargs="+", action=Distinct, default=None,
                        help="default: every algorithm DomainBed knows")
    parser.add_argument("--n_hparams_from", type=integer, default=0)
    parser.add_argument("--n_hparams", type=integer, default=20)
    parser.add_argument("--n_trials", type=integer, default=3)
    parser.add_argument("--steps", type=integer, default=None)
    parser.add_argument("--checkpoint_freq", type=integer, default=None)
    parser.add_argument("--hparams", type=str, default=None, help="JSON dict of hparams to override")
    parser.add_argument("--holdout_fraction", type=float, default=0.2)
    parser.add_argument("--data_dir", type=str, required=True)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--command_launcher", type=str, required=True)
    parser.add_argument("--sources", type=integer, nargs="+", action=Distinct, default=None,
                        help="source domain indices to run (default: every domain)")
    parser.add_argument("--seed", type=integer, default=0, help="seed of the shuffled launch order")
    parser.add_argument("--skip_confirmation", action="store_true")
    parser.add_argument("--no_progress", action="store_true",
                        help="no timed estimate before the launch and no progress bar (for logs)")
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
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), interrupted=lambda: "run the same command again to "
                       "launch the jobs that have no folder yet")


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
        print_plan(len(to_launch), f"{' '.join(args.algorithms)} on {' '.join(args.datasets)} x "
                   f"{steps}, launcher {args.command_launcher}",
                   None if args.no_progress else to_launch[0].train_args, checkout, SHRINK_FLAGS,
                   args.command_launcher)
    np.random.seed(args.seed)
    with JobProgress(done_in(job.output_dir for job in jobs), len(jobs), desc="single-source jobs",
                     disable=args.no_progress or not to_launch):
        sweep.Job.launch(to_launch, launcher_fn)


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
        print(f"About to delete {len(to_delete)} jobs.")
        if not args.skip_confirmation:
            sweep.ask_for_confirmation()
        sweep.Job.delete(to_delete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
