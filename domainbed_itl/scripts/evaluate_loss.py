"""Compare losses against cross-entropy out of domain, paired by seed, under one of two protocols.

    # the meta protocol: fresh MLPs trained on the source domains, tested on the held-out one
    python -m domainbed_itl.scripts.evaluate_loss meta --data_dir ./data \\
        --losses CE ITL learned=runs/meta/loss.json --seeds 0 1 2 3 4 --inner_steps 1000 3000 \\
        --output_dir runs/eval_meta

    # the DomainBed protocol: DomainBed's own train (its MNIST CNN for RotatedMNIST)
    python -m domainbed_itl.scripts.evaluate_loss domainbed --data_dir ./data \\
        --domainbed_root ../DomainBed --losses CE ITL learned=runs/meta/loss.json \\
        --test_envs 0 5 --n_trials 2 --output_dir runs/eval_domainbed --command_launcher local

A loss is `CE`, a zoo loss (BCE, Focal, SCE, GCE, LS, with their default parameters), a preset
(ITL) or a loss file, optionally labelled `label=...`. Both protocols write `evaluation.md` (the
tables) and `evaluation.json` (settings, every record and the statistics) to --output_dir:
per loss, held-out accuracy mean ± SE and range over the seeds (trials), and against
--reference (default CE) the paired differences, wins, a paired t-test and a Wilcoxon test.

`meta` trains in this process (domainbed_itl.meta.evaluate) and keeps each finished unit (a
loss on a seed) in --output_dir/checkpoint.pt as it finishes: running the same command again
continues an interrupted evaluation, and refuses, naming them, units computed with other
settings, data or loss parameters; a finished evaluation is replaced only with --overwrite.
`domainbed` (domainbed_itl.bridge.loss_evaluation) plans one DomainBed `train` job per (loss, test
environment, trial), or with --test_envs_together per (loss, trial) holding out all the test
environments at once (fewer jobs, each training on the other domains); every loss of a (test
environments, trial) gets the same --seed, so the losses share initial weights and minibatch
order; ERM for CE, ERM_<name> for zoo losses, ITL with `itl_loss` for presets and loss files,
hparams at their defaults (hparams seed 0). The jobs are DomainBed's `Job`s, launched through
its command launchers; running the command again launches only jobs without a folder, then
reports every finished one (model selection: training-domain validation, the checkpoint with
the best accuracy on the training environments' out splits, and the last checkpoint). `--report_only` launches
nothing. The report files are rewritten from the job folders each time; job folders are never
replaced, and records that cannot be read are listed in the report and skipped.

A loss that cannot train (an unreadable file, SCE weights below 0, values that are not finite or
a loss that would be maximised for the dataset's classes: domainbed_itl.losses.checks) is
refused before anything runs. The output folder has one writer (domainbed_itl.files.runlock).
Both protocols show a progress bar over their units with the time left (--no_progress: none).
Exit status: 0 done, 2 bad input, 130 interrupted (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence, Set

from ..analysis.loss_evaluation import (DOMAINBED_METRICS, REPORT_JSON, REPORT_MD, plan_report,
                                        tables, write_report)
from ..bridge.loss_evaluation import (DomainBedProtocol, check_request, collect, domainbed_modules,
                                      launch, parse_losses, plan_jobs, to_launch)
from ..files.atomic import OutputExists
from ..files.runfolder import open_run_folder
from ..files.runlock import folder_lock
from ..files.sweepfolder import remove_never_started
from ..meta.evaluate import EVALUATION_RUN
from ._cli import (Distinct, add_data_flags, check_data_flags, check_data_sizes, command_line, data_flags,
                   explicit_flags, integer, load_data, parse_device, positive_int, run_command)
from ._evaluation import (add_meta_protocol_flags, evaluate_meta, meta_losses, meta_metrics,
                          meta_protocol, meta_settings)


def build_parser() -> argparse.ArgumentParser:
    """The command line: a subcommand per protocol."""
    parser = argparse.ArgumentParser(prog="python -m domainbed_itl.scripts.evaluate_loss",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="protocol", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--losses", nargs="+", action=Distinct, required=True,
                        help="CE, a zoo loss, a preset or a loss file; LABEL=LOSS to name one")
    common.add_argument("--reference", default=None,
                        help="the label the others are compared with (default: CE if given, "
                             "else the first loss)")
    add_data_flags(common, sampling=False)
    common.add_argument("--output_dir", required=True)
    common.add_argument("--no_progress", action="store_true", help="no progress bar")
    _add_meta_parser(sub, common)
    _add_domainbed_parser(sub, common)
    return parser


def _add_meta_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    meta = sub.add_parser("meta", parents=[common], help="the inner loop of meta-training")
    add_meta_protocol_flags(meta)
    meta.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation")


def _add_domainbed_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    db = sub.add_parser("domainbed", parents=[common], help="DomainBed's own train")
    db.add_argument("--test_envs", type=integer, nargs="+", action=Distinct, required=True,
                    help="one run per test environment (each alone), or see --test_envs_together")
    db.add_argument("--test_envs_together", action="store_true",
                    help="one run per loss and trial holding out all --test_envs at once")
    db.add_argument("--n_trials", type=positive_int, default=2)
    db.add_argument("--steps", type=positive_int, default=None, help="default: the dataset's")
    db.add_argument("--checkpoint_freq", type=positive_int, default=None)
    db.add_argument("--hparams", default=None, help="JSON object of hparams for every run")
    db.add_argument("--holdout_fraction", type=float, default=0.2)
    db.add_argument("--command_launcher", default="local")
    db.add_argument("--report_only", action="store_true", help="launch nothing, report only")


def run_meta(args: argparse.Namespace, losses: Dict[str, str], reference: str, command: str,
             explicit: Set[str]) -> int:
    """The meta protocol, in this process, in a run folder that keeps its finished units."""
    protocol, device, flags = meta_protocol(args), parse_device(args.device), data_flags(args)
    check_data_flags(flags)
    with open_run_folder(args.output_dir, EVALUATION_RUN, resume=not args.overwrite,
                         overwrite=args.overwrite, command=command) as folder:
        done = [name for name in (REPORT_MD, REPORT_JSON) if (folder.path / name).exists()]
        have = {(u["unit"], u["loss"]) for u in (folder.checkpoint or {}).get("units", ())}
        # A rerun that adds seeds or losses continues; its reports replace these.
        if done and {(seed, label) for seed in args.seeds for label in losses} <= have:
            raise OutputExists(f"{folder.path} already holds an evaluation ({', '.join(done)}); "
                               "pass --overwrite to replace it, or add seeds or losses to "
                               "continue it")
        plan = plan_report(folder.path, "meta")
        data = load_data(flags)
        check_data_sizes(data, {"batch_size": protocol.batch_size, "eval_size": protocol.eval_size},
                         explicit)
        records = evaluate_meta(folder, data, meta_losses(losses, device, data.num_classes), args,
                                protocol, device,
                                command)
        settings = meta_settings(args, protocol)
        body, stats = tables(records, meta_metrics(protocol), reference, list(losses),
                             ["inner_steps"])
        write_report(plan, "Loss evaluation, meta protocol", settings, body,
                     {"settings": settings, "losses": losses, "reference": reference,
                      "statistics": stats, "records": records})
    print(body)
    return 0


def run_domainbed(args: argparse.Namespace, losses: Dict[str, str], reference: str,
                  command: str) -> int:
    """The DomainBed protocol: launch DomainBed's train jobs, then report the finished ones."""
    protocol = DomainBedProtocol(args.dataset, args.data_dir, tuple(args.test_envs), args.n_trials,
                                 args.steps, args.checkpoint_freq, args.hparams,
                                 args.holdout_fraction, args.test_envs_together)
    db = domainbed_modules(args.domainbed_root)
    check_request(db, protocol, losses, args.command_launcher)
    planned = plan_jobs(protocol, losses, db.misc.seed_hash)
    plan = plan_report(args.output_dir, "domainbed")
    with folder_lock(args.output_dir, command=command):  # one writer: the launch and the report
        if not args.report_only:
            remove_never_started(args.output_dir)
        units = to_launch(db, planned, args.output_dir)
        print(f"{len(planned)} jobs, {sum(map(len, units))} to launch; DomainBed from {db.checkout}")
        if units and not args.report_only:
            launch(db, units, args.command_launcher, progress=not args.no_progress)
        records, missing, damaged = collect(db, planned, args.output_dir)
        body, stats = (tables(records, DOMAINBED_METRICS, reference, list(losses), []) if records
                       else ("No finished job yet.", {}))
        if missing:
            body += "\n\nNot finished (left out above):\n\n" + "\n".join(f"- {m}" for m in missing)
        if damaged:
            body += "\n\nDamaged records (skipped):\n\n" + "\n".join(f"- {d}" for d in damaged)
        settings = protocol.settings()
        write_report(plan, "Loss evaluation, DomainBed protocol", settings, body,
                     {"settings": settings, "losses": losses, "reference": reference,
                      "statistics": stats, "records": records, "missing": missing,
                      "damaged": damaged})
    print(body)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command, explicit = command_line(argv, "evaluate_loss"), explicit_flags(parser, argv)

    def body() -> int:
        losses, reference = parse_losses(args.losses, args.reference, args.dataset)
        if args.protocol == "meta":
            return run_meta(args, losses, reference, command, explicit)
        return run_domainbed(args, losses, reference, command)

    return run_command(body, interrupted=lambda: "run the same command again to continue the "
                                                 f"evaluation in {args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())
