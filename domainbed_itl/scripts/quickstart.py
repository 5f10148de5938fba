"""From a fresh machine to an ERM vs ITL sweep in DomainBed, in one command.

    python -m domainbed_itl.scripts.quickstart --workdir ./itl_quickstart [--data_dir ./data]

1. DomainBed: takes `--domainbed_root`, an existing checkout, or else clones `--domainbed_url`
   (default: GitHub) at `--domainbed_commit` (default: the commit the patches were made against)
   into WORKDIR/DomainBed, or reuses that clone on a second run.
2. Patches it (`domainbed_itl.bridge.patching`) and verifies the hooks by importing it in a fresh
   interpreter.
3. Data: MNIST for RotatedMNIST and ColoredMNIST goes into --data_dir (default WORKDIR/data);
   where torchvision cannot download it, says which files to put where.
4. Runs DomainBed's own sweep (`domainbed.scripts.sweep launch`) of ERM and ITL on RotatedMNIST:
   each test environment once (`--single_test_envs`), DomainBed's default hparams
   (`--n_hparams 1`), one trial, `--steps` steps (12 jobs, one after the other with the `local`
   launcher), into WORKDIR/sweep.
5. Prints DomainBed's `collect_results` table.

Run it again to finish an interrupted sweep: DomainBed launches only jobs without a folder, so
the empty folders of jobs that never started are removed first; a job that started and did not
finish (failed, or killed) is listed with DomainBed's command that clears it.
The losses of our algorithms under --hparams are checked before any step, and the sweep folder
has one writer at a time (domainbed_itl.files.runlock). `--setup_only` stops after step 3; `--dry_run`
prints what would run. Exit status: 0 done, 1 a step or a job failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..bridge.domainbed_env import (DOMAINBED_URL, check_domainbed_root, clone_domainbed,
                             git_commit, with_pythonpath)
from ..experiments.paper import format_command
from ..bridge.domainbed_data import mnist_instructions, no_new_folders_on_error, reason_of
from ..bridge.hparams import check_sweep_losses, parse_hparams_flag
from ..bridge.patching import APPLIED, UPSTREAM_COMMIT, apply, import_check, status
from ..files.runlock import folder_lock
from ..files.sweepfolder import remove_never_started, unfinished_jobs
from ._cli import integer, run_command

MNIST_DATASETS = ("RotatedMNIST", "ColoredMNIST")


class QuickstartError(RuntimeError):
    """A step cannot be carried out; the message says why and what to do."""


class QuickstartInputError(QuickstartError):
    """A flag's value cannot make a quickstart."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="python -m domainbed_itl.scripts.quickstart",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=Path,
                        help="folder for the DomainBed clone, the data (by default) and the sweep")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="DomainBed's --data_dir (default: WORKDIR/data)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--domainbed_root", type=Path, default=None,
                        help="an existing DomainBed checkout to patch and use, instead of a clone")
    source.add_argument("--domainbed_url", default=DOMAINBED_URL,
                        help=f"where to clone DomainBed from (default: {DOMAINBED_URL})")
    parser.add_argument("--domainbed_commit", default=UPSTREAM_COMMIT,
                        help=f"the commit to check out in the clone (default: {UPSTREAM_COMMIT})")
    sweep = parser.add_argument_group("the sweep (DomainBed's sweep flags)")
    sweep.add_argument("--datasets", nargs="+", default=["RotatedMNIST"])
    sweep.add_argument("--algorithms", nargs="+", default=["ERM", "ITL"])
    sweep.add_argument("--steps", type=integer, default=1000)
    sweep.add_argument("--n_hparams", type=integer, default=1,
                       help="hparams seeds; 1: DomainBed's defaults only")
    sweep.add_argument("--n_trials", type=integer, default=1)
    sweep.add_argument("--hparams", default=None, help="JSON object of hparams to override")
    sweep.add_argument("--command_launcher", default="local",
                       help="a DomainBed launcher: local (serial), multi_gpu, submitit, ...")
    parser.add_argument("--setup_only", action="store_true",
                        help="stop once DomainBed is patched and the data is in place")
    parser.add_argument("--dry_run", action="store_true", help="print the steps only")
    return parser


def _validate(args: argparse.Namespace) -> None:
    for flag in ("steps", "n_hparams", "n_trials"):
        if getattr(args, flag) < 1:
            raise QuickstartInputError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
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
    return clone_domainbed(args.domainbed_url, args.domainbed_commit, dest)


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
    """Steps 4 and 5: DomainBed's sweep, then its collect_results."""
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
            print(f"{i}. PYTHONPATH={checkout} {format_command(command)}")
        return 0
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
              f"{format_command(sweep_commands(args, data_dir, output_dir)[0])}")
        return 0
    with folder_lock(output_dir):  # DomainBed's sweep takes no lock of its own
        return _sweep(args, root, data_dir, output_dir)


def _sweep(args: argparse.Namespace, root: Path, data_dir: Path, output_dir: Path) -> int:
    """Steps 4 and 5, holding the sweep folder's lock; the exit status."""
    env = with_pythonpath(root)
    launch, collect = sweep_commands(args, data_dir, output_dir)
    removed = remove_never_started(output_dir)
    if removed:
        print(f"{removed} job(s) of an earlier run never started; their empty folders are removed, "
              "so that they run now")
    print(f"\n$ {format_command(launch)}", flush=True)
    if subprocess.run(launch, env=env).returncode != 0:
        raise QuickstartError("DomainBed's sweep failed (see its output above)")
    print(f"\n$ {format_command(collect)}", flush=True)
    if subprocess.run(collect, env=env).returncode != 0:
        raise QuickstartError("DomainBed's collect_results failed (see its output above)")
    failed = unfinished_jobs(output_dir)
    if failed:
        delete = [*launch[:3], "delete_incomplete", *launch[4:-1]]  # DomainBed asks first
        print(f"\nerror: {len(failed)} job(s) did not finish, so the table above lacks them:\n  "
              + "\n  ".join(failed) + "\nFix the cause, clear them with\n  "
              f"PYTHONPATH={root} {format_command(delete)}\nand run this command again.",
              file=sys.stderr)
        return 1
    print(f"\ndone: DomainBed's sweep is in {output_dir}; its checkout, with our hooks, in {root}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args), expected=(QuickstartInputError,),
                       failures=(QuickstartError,),
                       interrupted=lambda: "run the same command again to finish the sweep")


if __name__ == "__main__":
    sys.exit(main())
