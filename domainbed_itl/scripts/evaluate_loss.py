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

`meta` trains in this process (domainbed_itl.meta.evaluate) and refuses a non-empty
--output_dir without --overwrite. `domainbed` plans one DomainBed `train` job per (loss, test
environment, trial), every loss of a (test environment, trial) with the same --seed, so the
losses share initial weights and minibatch order; ERM for CE, ERM_<name> for zoo losses, ITL
with `itl_loss` for presets and loss files, hparams at their defaults (hparams seed 0). The jobs
are DomainBed's `Job`s, launched through its command launchers; running the command again
launches only jobs without a folder, then reports every finished one (model selection:
DomainBed's training-domain validation, and the last checkpoint). `--report_only` launches
nothing. The report files are rewritten from the job folders each time; job folders are never
replaced, and records that cannot be read are listed in the report and skipped.

A loss that cannot train (an unreadable file, SCE weights below 0, values that are not finite or
a loss that would be maximised for the dataset's classes: domainbed_itl.losses.checks) is
refused before anything runs. The output folder has one writer (domainbed_itl.files.runlock).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..analysis import comparison
from ..files.atomic import OutputExists, write_atomic
from ..bridge.domainbed_env import DomainBedNotFound, import_domainbed, with_pythonpath
from ..bridge.algorithms import LossHparamError, check_loss_hparams
from ..bridge.hparams import DATASET_CLASSES
from ..losses import zoo
from ..losses.lossfile import LOSS_PRESETS, LossFileError, resolve_loss
from ..files.runlock import FolderLocked, folder_lock
from ..files.sweepfolder import load_runs, records_of
from .meta_train import _positive_float, _positive_int, _widths, add_convergence_flags

REPORT_MD, REPORT_JSON = "evaluation.md", "evaluation.json"
ZOO_ALGORITHMS = {"CE": "ERM", "BCE": "ERM_BCE", "Focal": "ERM_Focal", "SCE": "ERM_SCE",
                  "GCE": "ERM_GCE", "LS": "ERM_LS"}
# (record field, label, scale, digits) of the tables.
# (record field, label, scale, digits, higher is better)
META_METRICS = [("heldout_acc", "held-out acc. (%)", 100, 1, True),
                ("heldout_ce", "held-out CE", 1, 3, False),
                ("source_acc", "source acc. (%)", 100, 1, True),
                ("gap", "source − held-out (pts)", 100, 1, False)]
# With a stopping rule: how long each loss trained and how close it came to a stationary point.
CONVERGENCE_METRICS = [("inner_steps_used", "inner steps used", 1, 0, False),
                       ("stationarity", "stationarity (final / start gradient norm)", 1, 3, False)]
DOMAINBED_METRICS = [("test_acc", "test acc. (%), training-domain validation", 100, 1, True),
                     ("last_test_acc", "test acc. (%), last checkpoint", 100, 1, True),
                     ("val_acc", "training-domain validation acc. (%)", 100, 1, True)]


class EvaluationInputError(ValueError):
    """A flag value that cannot make an evaluation."""


def parse_loss(text: str) -> Tuple[str, str]:
    """(label, loss) from 'label=loss' or 'loss'; the loss is checked to resolve."""
    label, _, loss = (text.partition("=") if "=" in text and not os.path.exists(text)
                      else (text, "", text))
    if not label or not loss:
        raise EvaluationInputError(f"--losses entry {text!r}: expected LOSS or LABEL=LOSS")
    if loss not in ZOO_ALGORITHMS:
        try:
            resolve_loss(loss)
        except LossFileError as e:
            raise EvaluationInputError(f"--losses entry {text!r}: {e}; expected CE, "
                                       f"{', '.join(list(ZOO_ALGORITHMS)[1:])}, a preset "
                                       f"({', '.join(LOSS_PRESETS)}) or a loss file") from None
    return label, loss


def loss_function(loss: str):
    """The loss as a callable loss(logits, target, reduction=...)."""
    return zoo.ZOO[loss] if loss in ZOO_ALGORITHMS else resolve_loss(loss).module()


def build_parser() -> argparse.ArgumentParser:
    """The command line: a subcommand per protocol."""
    parser = argparse.ArgumentParser(prog="python -m domainbed_itl.scripts.evaluate_loss",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="protocol", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--losses", nargs="+", required=True,
                        help="CE, a zoo loss, a preset or a loss file; LABEL=LOSS to name one")
    common.add_argument("--reference", default=None,
                        help="the label the others are compared with (default: CE if given, "
                             "else the first loss)")
    common.add_argument("--data_dir", default=None, help="DomainBed's --data_dir")
    common.add_argument("--dataset", default="RotatedMNIST",
                        help="a DomainBed dataset (meta also takes 'synthetic')")
    common.add_argument("--domainbed_root", default=os.environ.get("DOMAINBED_ROOT"),
                        help="DomainBed checkout (default $DOMAINBED_ROOT, else `import domainbed`)")
    common.add_argument("--output_dir", required=True)
    meta = sub.add_parser("meta", parents=[common], help="the inner loop of meta-training")
    meta.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    meta.add_argument("--inner_steps", type=_positive_int, nargs="+", default=[1000],
                      help="report after each of these numbers of inner steps")
    meta.add_argument("--inner_optimizer", choices=("sgd", "momentum", "adam"), default="sgd")
    meta.add_argument("--inner_lr", type=_positive_float, default=0.01)
    meta.add_argument("--batch_size", type=_positive_int, default=32)
    meta.add_argument("--hidden", type=_widths, default=(256,))
    add_convergence_flags(meta)
    meta.add_argument("--eval_size", type=_positive_int, default=2048,
                      help="source examples behind the source accuracy")
    meta.add_argument("--per_domain_cap", type=_positive_int, default=None)
    meta.add_argument("--data_seed", type=int, default=0)
    meta.add_argument("--device", default="cpu")
    meta.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation")
    db = sub.add_parser("domainbed", parents=[common], help="DomainBed's own train")
    db.add_argument("--test_envs", type=int, nargs="+", required=True,
                    help="one run per test environment (each alone)")
    db.add_argument("--n_trials", type=_positive_int, default=2)
    db.add_argument("--steps", type=_positive_int, default=None, help="default: the dataset's")
    db.add_argument("--checkpoint_freq", type=_positive_int, default=None)
    db.add_argument("--hparams", default=None, help="JSON object of hparams for every run")
    db.add_argument("--holdout_fraction", type=float, default=0.2)
    db.add_argument("--command_launcher", default="local")
    db.add_argument("--report_only", action="store_true", help="launch nothing, report only")
    return parser


def _losses(args: argparse.Namespace) -> Tuple[Dict[str, str], str]:
    losses: Dict[str, str] = {}
    for text in args.losses:
        label, loss = parse_loss(text)
        if label in losses:
            raise EvaluationInputError(f"--losses names {label!r} twice; label them LABEL=LOSS")
        if loss not in ZOO_ALGORITHMS:  # trained as ITL with itl_loss = loss
            try:
                check_loss_hparams("ITL", {"itl_loss": loss}, DATASET_CLASSES.get(args.dataset))
            except LossHparamError as error:
                raise EvaluationInputError(f"--losses entry {text!r}: {error}") from None
        losses[label] = loss
    reference = args.reference or ("CE" if "CE" in losses else next(iter(losses)))
    if reference not in losses:
        raise EvaluationInputError(f"--reference {reference!r} is not one of the --losses labels "
                                   f"{', '.join(losses)}")
    return losses, reference


def _tables(records: List[Dict[str, Any]], metrics: Sequence[tuple], reference: str,
            order: Sequence[str], group: Sequence[str]) -> Tuple[str, Dict[str, Any]]:
    parts, stats = [], {}
    for field, label, scale, digits, higher_is_better in metrics:
        result = comparison.compare(records, field, reference, group, higher_is_better)
        stats[field] = comparison.to_jsonable(result, group)
        parts.append(f"### {label}\n\n" + comparison.markdown_table(
            result, label, reference, group, scale, digits, order))
    per_domain = comparison.compare(records, metrics[0][0], reference, [*group, "domain"],
                                    metrics[0][4])
    parts.append(f"### {metrics[0][1]}, per domain\n\n" + comparison.markdown_table(
        per_domain, metrics[0][1], reference, [*group, "domain"], metrics[0][2], metrics[0][3],
        order))
    return "\n\n".join(parts), stats


def _write_report(output_dir: Path, title: str, settings: Dict[str, Any], body: str,
                  payload: Dict[str, Any], overwrite: bool) -> None:
    lines = [f"# {title}", "", "Settings: `" + json.dumps(settings, sort_keys=True) + "`", "", body, ""]
    write_atomic(output_dir / REPORT_JSON, json.dumps(payload, indent=1) + "\n", overwrite=overwrite)
    write_atomic(output_dir / REPORT_MD, "\n".join(lines), overwrite=overwrite)


def run_meta(args: argparse.Namespace, losses: Dict[str, str], reference: str) -> None:
    """The meta protocol, in this process."""
    import torch

    from ..meta.evaluate import Protocol, evaluate_losses
    from .meta_train import _device, _load_data

    output_dir = Path(args.output_dir)
    existing = [p.name for p in (output_dir / REPORT_MD, output_dir / REPORT_JSON) if p.exists()]
    if existing and not args.overwrite:
        raise OutputExists(f"{output_dir} already holds an evaluation ({', '.join(existing)}); "
                           "pass --overwrite to replace it")
    convergence = {k: getattr(args, k) for k in ("inner_schedule", "inner_weight_decay",
                                                 "inner_stop_ratio", "inner_stop_every")
                   if getattr(args, k) is not None}
    protocol = Protocol(tuple(args.inner_steps), args.inner_lr, args.inner_optimizer,
                        batch_size=args.batch_size, hidden=args.hidden, eval_size=args.eval_size,
                        **convergence)
    device = _device(args.device)
    data = _load_data(args)
    functions = {}
    for label, loss in losses.items():
        fn = loss_function(loss)
        functions[label] = fn.to(device) if isinstance(fn, torch.nn.Module) else fn
    records = evaluate_losses(data, functions, args.seeds, protocol, device,
                              progress=lambda msg: print(msg, flush=True))
    settings = {"protocol": "meta", "dataset": args.dataset, "seeds": args.seeds,
                "per_domain_cap": args.per_domain_cap, "data_seed": args.data_seed,
                **protocol.to_dict()}
    metrics = META_METRICS + (CONVERGENCE_METRICS if protocol.inner_stop_ratio is not None else [])
    body, stats = _tables(records, metrics, reference, list(losses), ["inner_steps"])
    _write_report(output_dir, "Loss evaluation, meta protocol", settings, body,
                  {"settings": settings, "losses": losses, "reference": reference,
                   "statistics": stats, "records": records}, overwrite=True)
    print(body)


def plan_jobs(args: argparse.Namespace, losses: Dict[str, str],
              seed_hash) -> List[Tuple[dict, str, int, int]]:
    """(train args, loss label, test env, trial) of every DomainBed job, without output_dir.

    Every loss of a (test env, trial) gets the same seed, so the losses share initial weights
    and minibatch order; the trial seed fixes DomainBed's data splits.
    """
    extra = json.loads(args.hparams) if args.hparams else {}
    if not isinstance(extra, dict):
        raise EvaluationInputError(f"--hparams must be a JSON object, got {args.hparams!r}")
    jobs = []
    for test_env in args.test_envs:
        for trial in range(args.n_trials):
            seed = seed_hash("evaluate_loss", args.dataset, test_env, trial)
            for label, loss in losses.items():
                hparams = dict(extra)
                if loss in ZOO_ALGORITHMS:
                    algorithm = ZOO_ALGORITHMS[loss]
                else:
                    algorithm = "ITL"
                    hparams["itl_loss"] = loss if loss in LOSS_PRESETS else str(Path(loss).resolve())
                train_args = {"dataset": args.dataset, "algorithm": algorithm,
                              "test_envs": [test_env], "hparams_seed": 0, "trial_seed": trial,
                              "seed": seed, "data_dir": args.data_dir,
                              "holdout_fraction": args.holdout_fraction,
                              "task": "domain_generalization"}
                if hparams:
                    train_args["hparams"] = json.dumps(hparams, sort_keys=True)
                for flag in ("steps", "checkpoint_freq"):
                    if getattr(args, flag) is not None:
                        train_args[flag] = getattr(args, flag)
                jobs.append((train_args, label, test_env, trial))
    return jobs


def domainbed_records(jobs, results, selection) -> Tuple[List[Dict[str, Any]], List[str]]:
    """One record per finished job (loss, unit = trial, domain = test env, accuracies), and the
    jobs that are not finished. `results`: DomainBed's records (a Q) of the output folder."""
    records, missing = [], []
    for job, label, test_env, trial in jobs:
        folder = Path(job.output_dir)
        runs = results.filter(lambda r, name=folder.name: Path(r["args"]["output_dir"]).name == name)
        if not (folder / "done").exists() or not len(runs):
            missing.append(f"{label}, test env {test_env}, trial {trial}: {folder} ({job.state})")
            continue
        chosen = selection.run_acc(runs)
        last = runs.sorted(lambda r: r["step"])[-1]
        records.append({"loss": label, "unit": trial, "domain": f"env{test_env}",
                        "test_acc": chosen["test_acc"], "val_acc": chosen["val_acc"],
                        "last_test_acc": last[f"env{test_env}_in_acc"], "steps": last["step"] + 1,
                        "folder": folder.name})
    return records, missing


def run_domainbed(args: argparse.Namespace, losses: Dict[str, str], reference: str) -> None:
    """The DomainBed protocol: launch DomainBed's train jobs, then report the finished ones."""
    from ..bridge.patching import APPLIED, status

    sweep = import_domainbed(args.domainbed_root, "domainbed.scripts.sweep")
    datasets = import_domainbed(args.domainbed_root, "domainbed.datasets")
    misc = import_domainbed(args.domainbed_root, "domainbed.lib.misc")
    query = import_domainbed(args.domainbed_root, "domainbed.lib.query")
    model_selection = import_domainbed(args.domainbed_root, "domainbed.model_selection")
    launchers = import_domainbed(args.domainbed_root, "domainbed.command_launchers")
    checkout = Path(sweep.__file__).resolve().parents[2]
    if args.dataset not in datasets.DATASETS:
        raise EvaluationInputError(f"unknown dataset {args.dataset!r}; DomainBed knows "
                                   f"{', '.join(datasets.DATASETS)}")
    n_envs = datasets.num_environments(args.dataset)
    bad = [e for e in args.test_envs if not 0 <= e < n_envs]
    if bad:
        raise EvaluationInputError(f"--test_envs {bad[0]} is not an environment of {args.dataset} "
                                   f"(0..{n_envs - 1})")
    if not 0 < args.holdout_fraction < 1:
        raise EvaluationInputError(f"--holdout_fraction must lie in (0, 1), got {args.holdout_fraction}")
    if not Path(args.data_dir).is_dir():
        raise EvaluationInputError(f"--data_dir {args.data_dir!r} is not a folder")
    if args.command_launcher not in launchers.REGISTRY:
        raise EvaluationInputError(f"unknown --command_launcher {args.command_launcher!r}; expected "
                                   f"one of {', '.join(sorted(launchers.REGISTRY))}")
    if any(loss not in ("CE",) for loss in losses.values()):
        unpatched = [s for s in status(checkout) if s.kind != APPLIED]
        if unpatched:
            raise EvaluationInputError(
                f"the DomainBed checkout {checkout} lacks our patches, which its train needs for "
                f"ITL and ERM_<loss>: python -m domainbed_itl.scripts.patch apply "
                f"--domainbed_root {checkout}")
    try:
        planned = plan_jobs(args, losses, misc.seed_hash)
    except json.JSONDecodeError as e:
        raise EvaluationInputError(f"--hparams {args.hparams!r} is not JSON: {e}") from None
    with folder_lock(args.output_dir):  # one writer: the launch and the report
        jobs = [(sweep.Job(a, args.output_dir), label, env, trial) for a, label, env, trial in planned]
        if not args.report_only:
            # DomainBed's launch makes every job's folder before the first job runs: after an
            # interruption, a job that never started has an empty folder, which would block it.
            for job, *_ in jobs:
                folder = Path(job.output_dir)
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            jobs = [(sweep.Job(a, args.output_dir), label, env, trial)
                    for a, label, env, trial in planned]
        units: Dict[Tuple[int, int], list] = {}
        for job, _, test_env, trial in jobs:
            if job.state == sweep.Job.NOT_LAUNCHED:
                units.setdefault((test_env, trial), []).append(job)
        print(f"{len(jobs)} jobs, {sum(map(len, units.values()))} to launch; DomainBed from {checkout}")
        if units and not args.report_only:
            os.environ["PYTHONPATH"] = with_pythonpath(checkout)["PYTHONPATH"]  # the jobs inherit it
            # One (test env, trial) at a time: DomainBed's launch shuffles the jobs it is given,
            # and an interrupted evaluation should leave whole pairs, not scattered jobs.
            for unit_jobs in units.values():
                sweep.Job.launch(unit_jobs, launchers.REGISTRY[args.command_launcher])
        jobs = [(sweep.Job(a, args.output_dir), label, env, trial) for a, label, env, trial in planned]
        # DomainBed's reporting.load_records stops at the first damaged line; ours skips and lists it.
        found, damaged = records_of(load_runs(args.output_dir))
        records, missing = domainbed_records(jobs, query.Q(found),
                                             model_selection.IIDAccuracySelectionMethod)
        settings = {"protocol": "domainbed", "dataset": args.dataset, "test_envs": args.test_envs,
                    "n_trials": args.n_trials, "steps": args.steps, "hparams": args.hparams,
                    "holdout_fraction": args.holdout_fraction, "hparams_seed": 0}
        body, stats = (_tables(records, DOMAINBED_METRICS, reference, list(losses), []) if records
                       else ("No finished job yet.", {}))
        if missing:
            body += "\n\nNot finished (left out above):\n\n" + "\n".join(f"- {m}" for m in missing)
        if damaged:
            body += "\n\nDamaged records (skipped):\n\n" + "\n".join(f"- {d}" for d in damaged)
        _write_report(Path(args.output_dir), "Loss evaluation, DomainBed protocol", settings, body,
                      {"settings": settings, "losses": losses, "reference": reference,
                       "statistics": stats, "records": records, "missing": missing,
                       "damaged": damaged}, overwrite=True)
        print(body)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        losses, reference = _losses(args)
        if args.protocol == "meta":
            with folder_lock(args.output_dir):
                run_meta(args, losses, reference)
        else:
            run_domainbed(args, losses, reference)
    except (EvaluationInputError, DomainBedNotFound, OutputExists, FileNotFoundError,
            ValueError, FolderLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
