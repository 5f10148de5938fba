"""From a fresh machine to an ERM vs ITL sweep in DomainBed, in one command.

    python -m domainbed_itl.scripts.quickstart --workdir ./itl_quickstart [--data_dir ./data]

See docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from ..bridge.domainbed_env import (DOMAINBED_URL, DomainBedNotFound, check_domainbed_root, clone_domainbed,
                             git_commit, import_domainbed, with_pythonpath, with_quiet_loaders)
from ..experiments.paper import format_command
from ..bridge.domainbed_data import mnist_instructions, no_new_folders_on_error, reason_of
from ..bridge.hparams import check_sweep_losses, parse_hparams_flag
from ..bridge.launchers import (OUTPUT_LOG, SubmititJobsFailed, launch_jobs, launch_order,
                                make_local_launcher)
from ..bridge.patching import APPLIED, UPSTREAM_COMMIT, apply, import_check, status
from ..bridge.sweep_estimate import print_plan
from ..files.job_progress import JobProgress, done_in, steps_done_in
from ..files.runlock import folder_lock
from ..files.running_jobs import clear_for_relaunch, finished_view, to_relaunch, unfinished
from ..files.sweepfolder import last_error_line, remove_never_started, unfinished_jobs
from ._cli import CommandParser, command_main, integer

MNIST_DATASETS = ("RotatedMNIST", "ColoredMNIST")
SHRINK_FLAGS = ("--steps", "--test_envs", "--algorithms", "--n_hparams", "--n_trials")


class QuickstartError(RuntimeError):
    """A step cannot be carried out; the message says why and what to do."""


class QuickstartInputError(QuickstartError):
    """A flag's value cannot make a quickstart."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=Path,
                        help="folder for the DomainBed clone, the data (by default) and the sweep")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="DomainBed's --data_dir (default: WORKDIR/data)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--domainbed_root", type=Path, default=None,
                        help="an existing DomainBed checkout to patch and use, instead of a clone "
                             "(default: clone one into WORKDIR/DomainBed)")
    source.add_argument("--domainbed_url", default=DOMAINBED_URL,
                        help="where to clone DomainBed from: a URL or a local clone or mirror "
                             "(default: %(default)s)")
    parser.add_argument("--domainbed_commit", default=UPSTREAM_COMMIT,
                        help="the commit to check out in the clone (default: %(default)s)")
    sweep = parser.add_argument_group("the sweep (DomainBed's sweep flags)")
    sweep.add_argument("--datasets", nargs="+", default=["RotatedMNIST"],
                       help="DomainBed data sets (default: RotatedMNIST)")
    sweep.add_argument("--algorithms", nargs="+", default=["ERM", "ITL"],
                       help="DomainBed algorithms, ours included (default: ERM ITL)")
    sweep.add_argument("--test_envs", nargs="+", type=integer, default=None,
                       help="the test environments to run, each alone (default: every environment "
                            "of each dataset, 6 for RotatedMNIST)")
    sweep.add_argument("--steps", type=integer, default=1000,
                       help="training steps per job (default: %(default)s)")
    sweep.add_argument("--n_hparams", type=integer, default=1,
                       help="hparams seeds; 1: DomainBed's defaults only (default: %(default)s)")
    sweep.add_argument("--n_trials", type=integer, default=1, help="trials (default: %(default)s)")
    sweep.add_argument("--hparams", default=None,
                       help="JSON object of hparams to override, e.g. '{\"batch_size\": 32}' "
                            "(default: none)")
    sweep.add_argument("--command_launcher", default="local",
                       help="a DomainBed launcher: local (one job after the other), multi_gpu, "
                            "submitit, ... (default: %(default)s)")
    parser.add_argument("--setup_only", action="store_true",
                        help="stop once DomainBed is patched and the data is in place")
    parser.add_argument("--dry_run", action="store_true", help="print the steps only")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bar and no timed estimate (for logs)")
    parser.add_argument("--verbose", action="store_true",
                        help=f"DomainBed's own output on the screen (default: with the local "
                             f"launcher, in each job's folder, {OUTPUT_LOG})")
    return parser


def _validate(args: argparse.Namespace) -> None:
    for flag in ("steps", "n_hparams", "n_trials"):
        if getattr(args, flag) < 1:
            raise QuickstartInputError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if any(env < 0 for env in args.test_envs or ()):
        raise QuickstartInputError(f"--test_envs must be environment indices (0, 1, ...), got "
                                   f"{' '.join(map(str, args.test_envs))}")
    try:
        overrides = parse_hparams_flag(args.hparams) if args.hparams is not None else {}
        check_sweep_losses(args.algorithms, args.datasets, overrides)
    except ValueError as error:
        raise QuickstartInputError(str(error)) from None
    if args.workdir.exists() and not args.workdir.is_dir():
        raise QuickstartInputError(f"--workdir {args.workdir} exists and is not a folder")


def domainbed_checkout(args: argparse.Namespace) -> Path:
    """Step 1: the checkout to use: --domainbed_root, the earlier clone, or a new clone."""
    if args.domainbed_root is not None:
        root = check_domainbed_root(args.domainbed_root)
        print(f"DomainBed: the checkout {root} (it will carry our hooks)")
        return root
    dest = args.workdir.resolve() / "DomainBed"
    if dest.exists():
        root = check_domainbed_root(dest)
        print(f"DomainBed: reusing {root} (at commit {git_commit(root) or 'unknown'})")
        return root
    print(f"DomainBed: cloning {args.domainbed_url} at {args.domainbed_commit} into {dest}", flush=True)
    try:
        return clone_domainbed(args.domainbed_url, args.domainbed_commit, dest)
    except DomainBedNotFound as error:
        raise DomainBedNotFound(
            f"{error}. Without network access to it, clone DomainBed elsewhere and pass "
            "--domainbed_root path/to/DomainBed (a checkout to use as it is), or --domainbed_url "
            "with a local clone or mirror to clone from") from None


def patch_and_verify(root: Path) -> None:
    """Step 2: apply the hooks (refused unchanged if they do not fit), and import them."""
    done = apply(root)
    states = status(root)
    if any(s.kind != APPLIED for s in states):
        raise QuickstartError(f"after patching, {root} reads {', '.join(map(str, states))}")
    problem = import_check(root)
    if problem:
        raise QuickstartError(f"the patched DomainBed in {root} does not register ITL: {problem}")
    print(f"patches: {'applied ' + ', '.join(done) if done else 'already applied'}; verified by "
          "importing DomainBed")


def mnist_problem(data_dir: Path, download: bool = True) -> Optional[str]:
    """Step 3 for RotatedMNIST/ColoredMNIST: None when torchvision's MNIST loads from `data_dir`
    (downloading it there if need be), else what to put where."""
    from torchvision.datasets import MNIST

    try:
        with no_new_folders_on_error(data_dir):
            for train in (True, False):
                MNIST(str(data_dir), train=train, download=download)
        return None
    except Exception as error:  # no network, a proxy, a partial download...
        return mnist_instructions(data_dir, reason_of(error))


def sweep_commands(args: argparse.Namespace, data_dir: Path, output_dir: Path) -> List[List[str]]:
    """Steps 4 and 5: DomainBed's sweep (whose jobs, with --test_envs some of them, run), then
    its collect_results."""
    launch = [sys.executable, "-m", "domainbed.scripts.sweep", "launch",
              "--datasets", *args.datasets, "--algorithms", *args.algorithms,
              "--data_dir", str(data_dir), "--output_dir", str(output_dir),
              "--command_launcher", args.command_launcher, "--n_hparams", str(args.n_hparams),
              "--n_trials", str(args.n_trials), "--single_test_envs", "--steps", str(args.steps),
              *(["--hparams", args.hparams] if args.hparams else []), "--skip_confirmation"]
    collect = [sys.executable, "-m", "domainbed.scripts.collect_results", "--input_dir",
               str(output_dir)]
    return [launch, collect]


def run(args: argparse.Namespace) -> int:
    """All the steps; the exit status."""
    _validate(args)
    workdir = args.workdir.resolve()
    data_dir = (args.data_dir or workdir / "data").resolve()
    output_dir = workdir / "sweep"
    if args.dry_run:
        checkout = args.domainbed_root or workdir / "DomainBed"
        print(f"1. DomainBed: {checkout}" + ("" if args.domainbed_root else
                                             f" (cloned from {args.domainbed_url} at "
                                             f"{args.domainbed_commit} unless it exists)"))
        print(f"2. python -m domainbed_itl.scripts.patch apply --domainbed_root {checkout}")
        print(f"3. data in {data_dir}")
        for i, command in enumerate(sweep_commands(args, data_dir, output_dir), start=4):
            print(f"{i}. PYTHONPATH={checkout} {format_command(command)}" + (_only(args) if i == 4 else ""))
        return 0
    if args.domainbed_root is not None:
        check_domainbed_root(args.domainbed_root)  # before a folder is made
    with _no_new_empty_folders(workdir), _no_new_empty_folders(data_dir):
        return _set_up_and_sweep(args, workdir, data_dir, output_dir)


@contextlib.contextmanager
def _no_new_empty_folders(folder: Path) -> Iterator[None]:
    """On an exception (a refusal), remove `folder`, its missing parents and the folders under
    it that the block made and left empty: a refused quickstart leaves no empty work folders."""
    made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    try:
        with no_new_folders_on_error(folder):
            yield
    except BaseException:
        for path in made:  # deepest first; one holding files stays
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def _set_up_and_sweep(args: argparse.Namespace, workdir: Path, data_dir: Path, output_dir: Path) -> int:
    """Steps 1 to 5 (see `run`); the exit status."""
    workdir.mkdir(parents=True, exist_ok=True)
    root = domainbed_checkout(args)
    patch_and_verify(root)
    data_dir.mkdir(parents=True, exist_ok=True)
    if set(args.datasets) & set(MNIST_DATASETS):
        problem = mnist_problem(data_dir)
        if problem:
            raise QuickstartError(problem)
        print(f"data: MNIST in {data_dir}")
    if args.setup_only:
        print(f"set up. The sweep would run:\n  PYTHONPATH={root} "
              f"{format_command(sweep_commands(args, data_dir, output_dir)[0])}{_only(args)}")
        return 0
    with folder_lock(output_dir):  # DomainBed's sweep takes no lock of its own
        return _sweep(args, root, data_dir, output_dir)


def _only(args: argparse.Namespace) -> str:
    """What --test_envs keeps of the sweep's jobs, for the printed command."""
    if args.test_envs is None:
        return ""
    return f"  (only its jobs with test env {', '.join(map(str, args.test_envs))})"


def plan_jobs(args: argparse.Namespace, data_dir: Path, sweep, num_environments) -> List[dict]:
    """The train arguments of the jobs to run: DomainBed's sweep's (`sweep.make_args_list` with
    single test environments), those of --test_envs only."""
    for dataset in args.datasets:
        n = num_environments(dataset)
        outside = [env for env in args.test_envs or () if env >= n]
        if outside:
            raise QuickstartInputError(f"--test_envs {outside[0]} is not an environment of {dataset}, "
                                       f"whose environments are 0..{n - 1}")
    every = sweep.make_args_list(
        n_trials=args.n_trials, dataset_names=args.datasets, algorithms=args.algorithms,
        n_hparams_from=0, n_hparams=args.n_hparams, steps=args.steps, data_dir=str(data_dir),
        task="domain_generalization", holdout_fraction=0.2, single_test_envs=True,
        hparams=args.hparams)
    return [a for a in every if args.test_envs is None or a["test_envs"][0] in args.test_envs]


def _launch(args: argparse.Namespace, root: Path, data_dir: Path, output_dir: Path) -> None:
    """Step 4: relaunch the unfinished jobs of an earlier run and launch the jobs not launched
    yet, with a plan, an estimate and a progress bar."""
    sweep = import_domainbed(root, "domainbed.scripts.sweep")
    datasets = import_domainbed(root, "domainbed.datasets")
    launchers = import_domainbed(root, "domainbed.command_launchers")
    if args.command_launcher not in launchers.REGISTRY:
        raise QuickstartInputError(f"unknown --command_launcher {args.command_launcher!r}; expected "
                                   f"one of {', '.join(sorted(launchers.REGISTRY))}")
    planned = plan_jobs(args, data_dir, sweep, datasets.num_environments)
    _relaunch_unfinished([sweep.Job(a, str(output_dir)) for a in planned])
    jobs = [sweep.Job(a, str(output_dir)) for a in planned]  # their states after the removal
    states = [job.state for job in jobs]
    print("{} jobs: {} done, {} incomplete, {} not launched.".format(
        len(jobs), states.count(sweep.Job.DONE), states.count(sweep.Job.INCOMPLETE),
        states.count(sweep.Job.NOT_LAUNCHED)))
    to_launch = [job for job in jobs if job.state == sweep.Job.NOT_LAUNCHED]
    print(f"About to launch {len(to_launch)} jobs.", flush=True)
    if not to_launch:
        return
    detail = (f"{' '.join(args.algorithms)} on {' '.join(args.datasets)} x {args.steps} steps, "
              f"{args.n_hparams} hparams seed(s), {args.n_trials} trial(s), launcher "
              f"{args.command_launcher}")
    order = [job.train_args for job in launch_order(to_launch)]  # Job.launch shuffles them
    state = np.random.get_state()
    print_plan(len(to_launch), detail, None if args.no_progress else order[0], root, SHRINK_FLAGS,
               args.command_launcher, jobs=None if args.no_progress else order)
    np.random.set_state(state)  # so that Job.launch shuffles as `launch_order` said
    os.environ.update(with_quiet_loaders(with_pythonpath(root)))  # the jobs inherit it
    local = args.command_launcher == "local"
    launcher_fn = (make_local_launcher(verbose=args.verbose) if local
                   else launchers.REGISTRY[args.command_launcher])
    folders = [job.output_dir for job in jobs]
    with JobProgress(steps_done_in(folders, [args.steps] * len(jobs)), args.steps * len(jobs),
                     desc="quickstart jobs", disable=args.no_progress, unit="step", interval=1.0,
                     jobs=(done_in(folders), len(jobs))):
        try:
            closing = launch_jobs(sweep.Job, to_launch, launcher_fn, quiet=local and not args.verbose)
        except SubmititJobsFailed as error:  # listed again below, with DomainBed's remedy
            print(f"error: {error}", file=sys.stderr)
            closing = ""
    print(closing, end="", flush=True)


def _relaunch_unfinished(jobs: list) -> None:
    """Remove the folders of the jobs of an earlier run that started and did not finish, saying
    so, so that they run again; refused while one of them still runs."""
    folders = [job.output_dir for job in jobs]
    reasons = {Path(f): last_error_line(f) or "no error logged" for f in unfinished(folders)}
    removed = clear_for_relaunch(folders)
    if removed:
        print(f"{len(removed)} job(s) of an earlier run did not finish (interrupted or failed); "
              "their folders are removed and they run again:\n  " + "\n  ".join(
                  f"{folder}: {reasons[folder]}" for folder in removed), flush=True)


def _sweep(args: argparse.Namespace, root: Path, data_dir: Path, output_dir: Path) -> int:
    """Steps 4 and 5, holding the sweep folder's lock; the exit status."""
    env = with_pythonpath(root)
    launch, collect = sweep_commands(args, data_dir, output_dir)
    removed = remove_never_started(output_dir)
    if removed:
        print(f"{removed} job(s) of an earlier run never started; their empty folders are removed, "
              "so that they run now")
    print(f"\n$ {format_command(launch)}{_only(args)}", flush=True)
    _launch(args, root, data_dir, output_dir)
    print(f"\n$ {format_command(collect)}  (its finished jobs only)", flush=True)
    with tempfile.TemporaryDirectory(prefix="finished-jobs-") as view:
        finished_view(output_dir, view)
        if subprocess.run([*collect[:-1], view], env={**env, "TQDM_DISABLE": "1"}).returncode != 0:
            raise QuickstartError("DomainBed's collect_results failed (see its output above)")
        shutil.copyfile(Path(view) / "results.txt", output_dir / "results.txt")
    failed = unfinished_jobs(output_dir)
    if failed:
        _, busy = to_relaunch(p for p in output_dir.iterdir() if p.is_dir())
        delete = [*launch[:3], "delete_incomplete", *launch[4:]]  # ends in --skip_confirmation
        remedy = ("\nFix the cause, clear them with\n  "
                  f"PYTHONPATH={root} {format_command(delete)}\nand run this command again (or just "
                  "run it again: it removes and relaunches them itself; none of them runs now)."
                  if not busy else  # DomainBed's delete_incomplete would delete running jobs
                  "\nSome still run (" + "; ".join(busy) + "): let them end, then run this "
                  "command again: it removes and relaunches those that did not finish.")
        print(f"\nerror: {len(failed)} job(s) did not finish, so the table above leaves them out:\n  "
              + "\n  ".join(failed) + remedy, file=sys.stderr)
        return 1
    print(f"\ndone: DomainBed's sweep is in {output_dir}, its table in {output_dir / 'results.txt'}; its "
          f"checkout, with our hooks, in {root}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    return command_main(argv, build_parser, run, expected=(QuickstartInputError,),
                        failures=(QuickstartError,),
                        interrupted=lambda args: "the running job was stopped; run the same "
                        "command again: it relaunches that job and runs the rest")


if __name__ == "__main__":
    sys.exit(main())
