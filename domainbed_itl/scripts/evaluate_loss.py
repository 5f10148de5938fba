"""Compare losses against cross-entropy out of domain, paired by seed, under one of two protocols.

See docs/loss_search.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Set

from ..analysis.evaluation_report import (DOMAINBED_METRICS, REPORT_JSON, REPORT_MD, plan_report,
                                        tables, write_report)
from ..bridge.sweep_estimate import print_plan
from ..bridge.loss_evaluation import (DomainBedProtocol, check_request, collect, domainbed_modules,
                                      jobs_of, launch, parse_losses, plan_jobs, to_launch)
from ..files.atomic import OutputExists
from ..files.runfolder import open_run_folder
from ..files.runlock import folder_lock
from ..files.running_jobs import clear_for_relaunch
from ..files.sweepfolder import remove_never_started
from ..meta.evaluate import EVALUATION_RUN
from ._cli import (CommandParser, Distinct, add_data_flags, check_data_flags, check_data_sizes, command_line,
                   data_flags, explicit_flags, integer, load_data, parse_device, positive_int,
                   run_command)
from ._evaluation import (DefaultsHelp, add_meta_protocol_flags, evaluate_meta, meta_losses,
                          meta_metrics, meta_protocol, meta_settings, name_reports, said_once)

DOMAINBED_SHRINK = ("--steps", "--test_envs", "--n_trials", "--losses")


def build_parser() -> argparse.ArgumentParser:
    """The command line: a subcommand per protocol."""
    parser = CommandParser("evaluate_loss", description=__doc__.split("\n\n")[0],
                           formatter_class=DefaultsHelp)
    sub = parser.add_subparsers(dest="protocol", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--losses", nargs="+", action=Distinct, required=True,
                        help="CE, a zoo loss, a preset or a loss file; LABEL=LOSS to name one")
    common.add_argument("--reference", default=None,
                        help="the label the others are compared with (default: CE if given, "
                             "else the first loss)")
    add_data_flags(common, sampling=False)
    common.add_argument("--output_dir", required=True,
                        help="where the reports (evaluation.md, evaluation.json) go")
    common.add_argument("--no_progress", action="store_true", help="no progress bar")
    _add_meta_parser(sub, common)
    _add_domainbed_parser(sub, common)
    return parser


def _add_meta_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    meta = sub.add_parser("meta", parents=[common], help="the inner loop of meta-training",
                          formatter_class=DefaultsHelp)
    add_meta_protocol_flags(meta)
    meta.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation")


def _add_domainbed_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    db = sub.add_parser("domainbed", parents=[common], help="DomainBed's own train",
                        formatter_class=DefaultsHelp)
    db.add_argument("--test_envs", type=integer, nargs="+", action=Distinct, required=True,
                    help="one run per test environment (each alone), or see --test_envs_together")
    db.add_argument("--test_envs_together", action="store_true",
                    help="one run per loss and trial holding out all --test_envs at once")
    db.add_argument("--n_trials", type=positive_int, default=2, help="trials (DomainBed's trial seeds)")
    db.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the "
                                                                     "dataset's)")
    db.add_argument("--checkpoint_freq", type=positive_int, default=None,
                    help="steps between checkpoints (default: the dataset's)")
    db.add_argument("--hparams", default=None, help="JSON object of hparams for every run (default: "
                                                    "none)")
    db.add_argument("--holdout_fraction", type=float, default=0.2,
                    help="DomainBed's validation fraction of each domain")
    db.add_argument("--command_launcher", default="local",
                    help="a DomainBed launcher: local, multi_gpu, submitit, ...")
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
        with said_once():
            body, stats = tables(records, meta_metrics(protocol), reference, list(losses),
                                 ["inner_steps"])
        write_report(plan, "Loss evaluation, meta protocol", settings, body,
                     {"settings": settings, "losses": losses, "reference": reference,
                      "statistics": stats, "records": records})
    print(body)
    name_reports(plan.paths)
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
            relaunched = clear_for_relaunch(Path(job.output_dir) for job, *_ in
                                            jobs_of(db, planned, args.output_dir))
            if relaunched:
                print(f"{len(relaunched)} job(s) of an earlier run did not finish (interrupted or "
                      "failed); their folders are removed and they run again: "
                      + ", ".join(folder.name for folder in relaunched))
        units = to_launch(db, planned, args.output_dir)
        print(f"{len(planned)} jobs, {sum(map(len, units))} to launch; DomainBed from {db.checkout}")
        if units and not args.report_only:
            jobs = [job.train_args for unit in units for job in unit]
            print_plan(len(jobs), f"{len(losses)} losses on {args.dataset}, launcher "
                       f"{args.command_launcher}", None if args.no_progress else jobs[0],
                       db.checkout, DOMAINBED_SHRINK, args.command_launcher,
                       jobs=None if args.no_progress else jobs)
            launch(db, units, args.command_launcher, progress=not args.no_progress)
        records, missing, damaged = collect(db, planned, args.output_dir)
        with said_once():
            body, stats = (tables(records, DOMAINBED_METRICS, reference, list(losses), [])
                           if records else ("No finished job yet.", {}))
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
    name_reports(plan.paths)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (docs/loss_search.md)."""
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
