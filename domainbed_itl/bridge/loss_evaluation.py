"""The loss evaluation's DomainBed side (scripts/evaluate_loss): the losses it takes, and its
DomainBed protocol.

See docs/loss_search.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from ..datasets import num_classes
from ..files.sweepfolder import load_runs, records_of
from ..losses import zoo
from ..losses.lossfile import LOSS_PRESETS, LossFileError, resolve_loss
from .algorithms import ZOO_ALGORITHMS, LossHparamError, check_loss_hparams
from .domainbed_env import import_domainbed, with_pythonpath
from .launchers import launch_jobs, make_local_launcher
from .patching import APPLIED, status

# (train args, loss label, its test envs, trial) of one planned job.
PlannedJob = Tuple[Dict[str, Any], str, Tuple[int, ...], int]


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


def parse_losses(entries: Sequence[str], reference: Optional[str],
                 dataset: str) -> Tuple[Dict[str, str], str]:
    """({label: loss}, the reference label) of --losses and --reference, every loss checked to
    train for `dataset`'s classes (where domainbed_itl.datasets knows them)."""
    losses: Dict[str, str] = {}
    for text in entries:
        label, loss = parse_loss(text)
        if label in losses:
            raise EvaluationInputError(f"--losses names {label!r} twice; label them LABEL=LOSS")
        if loss not in ZOO_ALGORITHMS:  # trained as ITL with itl_loss = loss
            try:
                check_loss_hparams("ITL", {"itl_loss": loss}, num_classes(dataset))
            except LossHparamError as error:
                raise EvaluationInputError(f"--losses entry {text!r}: {error}") from None
        losses[label] = loss
    reference = reference or ("CE" if "CE" in losses else next(iter(losses)))
    if reference not in losses:
        raise EvaluationInputError(f"--reference {reference!r} is not one of the --losses labels "
                                   f"{', '.join(losses)}")
    return losses, reference


def loss_function(loss: str) -> Callable:
    """The loss as a callable loss(logits, target, reduction=...)."""
    return zoo.ZOO[loss] if loss in ZOO_ALGORITHMS else resolve_loss(loss).module()


def loss_definition(loss: str) -> Dict[str, Any]:
    """What a loss computes (a zoo name, or a family, order and parameters): an evaluation's
    finished units are kept only for the same definition."""
    if loss in ZOO_ALGORITHMS:
        return {"zoo": loss}
    return resolve_loss(loss).definition()


@dataclass(frozen=True)
class DomainBedProtocol:
    """The DomainBed protocol's settings: dataset and its --data_dir, the test environments
    (each alone, or all in one job when `together`), trials, steps, checkpoint frequency,
    --hparams (a JSON object) and the holdout fraction."""

    dataset: str
    data_dir: str
    test_envs: Tuple[int, ...]
    n_trials: int = 2
    steps: Optional[int] = None
    checkpoint_freq: Optional[int] = None
    hparams: Optional[str] = None
    holdout_fraction: float = 0.2
    together: bool = False

    def groups(self) -> List[Tuple[int, ...]]:
        """The test environments of each job: one group of all, or each alone."""
        return [tuple(self.test_envs)] if self.together else [(e,) for e in self.test_envs]

    def extra_hparams(self) -> Dict[str, Any]:
        """--hparams as a dict; EvaluationInputError unless it is a JSON object."""
        try:
            extra = json.loads(self.hparams) if self.hparams else {}
        except json.JSONDecodeError as e:
            raise EvaluationInputError(f"--hparams {self.hparams!r} is not JSON: {e}") from None
        if not isinstance(extra, dict):
            raise EvaluationInputError(f"--hparams must be a JSON object, got {self.hparams!r}")
        return extra

    def settings(self) -> Dict[str, Any]:
        """The settings as the report states them."""
        return {"protocol": "domainbed", "dataset": self.dataset, "test_envs": list(self.test_envs),
                "test_envs_together": self.together, "n_trials": self.n_trials,
                "steps": self.steps, "hparams": self.hparams,
                "holdout_fraction": self.holdout_fraction, "hparams_seed": 0}


def domainbed_modules(root: Optional[str]) -> SimpleNamespace:
    """The DomainBed modules the protocol uses (sweep, datasets, misc, query, model_selection,
    launchers) and the checkout they come from."""
    names = {"sweep": "scripts.sweep", "datasets": "datasets", "misc": "lib.misc",
             "query": "lib.query", "model_selection": "model_selection",
             "launchers": "command_launchers"}
    modules = {k: import_domainbed(root, f"domainbed.{v}") for k, v in names.items()}
    return SimpleNamespace(**modules, checkout=Path(modules["sweep"].__file__).resolve().parents[2])


def check_request(db: SimpleNamespace, protocol: DomainBedProtocol, losses: Dict[str, str],
                  launcher: str) -> None:
    """EvaluationInputError naming the first value DomainBed cannot run: the dataset, a test
    environment, the holdout fraction, the data folder, the launcher, or a checkout without
    our patches when a loss needs them."""
    if protocol.dataset not in db.datasets.DATASETS:
        raise EvaluationInputError(f"unknown dataset {protocol.dataset!r}; DomainBed knows "
                                   f"{', '.join(db.datasets.DATASETS)}")
    n_envs = db.datasets.num_environments(protocol.dataset)
    bad = [e for e in protocol.test_envs if not 0 <= e < n_envs]
    if bad:
        raise EvaluationInputError(f"--test_envs {bad[0]} is not an environment of "
                                   f"{protocol.dataset} (0..{n_envs - 1})")
    if not 0 < protocol.holdout_fraction < 1:
        raise EvaluationInputError(f"--holdout_fraction must lie in (0, 1), got {protocol.holdout_fraction}")
    if protocol.data_dir is None or not Path(protocol.data_dir).is_dir():
        raise EvaluationInputError(f"--data_dir {protocol.data_dir!r} is not a folder")
    if launcher not in db.launchers.REGISTRY:
        raise EvaluationInputError(f"unknown --command_launcher {launcher!r}; expected one of "
                                   f"{', '.join(sorted(db.launchers.REGISTRY))}")
    if any(loss != "CE" for loss in losses.values()) and any(
            s.kind != APPLIED for s in status(db.checkout)):
        raise EvaluationInputError(
            f"the DomainBed checkout {db.checkout} lacks our patches, which its train needs for "
            f"ITL and ERM_<loss>: python -m domainbed_itl.scripts.patch apply --domainbed_root "
            f"{db.checkout}")


def plan_jobs(protocol: DomainBedProtocol, losses: Dict[str, str],
              seed_hash: Callable[..., int]) -> List[PlannedJob]:
    """(train args, loss label, test envs, trial) of every DomainBed job, without output_dir.

    Every loss of a (test envs, trial) gets the same seed, so the losses share initial weights
    and minibatch order; the trial seed fixes DomainBed's data splits.
    """
    extra, jobs = protocol.extra_hparams(), []
    for group in protocol.groups():
        for trial in range(protocol.n_trials):
            seed = seed_hash("evaluate_loss", protocol.dataset, *group, trial)
            for label, loss in losses.items():
                jobs.append((_train_args(protocol, loss, extra, group, trial, seed), label,
                             group, trial))
    return jobs


def _train_args(protocol: DomainBedProtocol, loss: str, extra: Dict[str, Any],
                test_envs: Tuple[int, ...], trial: int, seed: int) -> Dict[str, Any]:
    """DomainBed train's arguments for one job: ERM_<loss> for a zoo loss, else ITL."""
    hparams = dict(extra)
    if loss in ZOO_ALGORITHMS:
        algorithm = ZOO_ALGORITHMS[loss]
    else:
        algorithm = "ITL"
        hparams["itl_loss"] = loss if loss in LOSS_PRESETS else str(Path(loss).resolve())
    train_args = {"dataset": protocol.dataset, "algorithm": algorithm, "test_envs": list(test_envs),
                  "hparams_seed": 0, "trial_seed": trial, "seed": seed,
                  "data_dir": protocol.data_dir, "holdout_fraction": protocol.holdout_fraction,
                  "task": "domain_generalization"}
    if hparams:
        train_args["hparams"] = json.dumps(hparams, sort_keys=True)
    for flag in ("steps", "checkpoint_freq"):
        if getattr(protocol, flag) is not None:
            train_args[flag] = getattr(protocol, flag)
    return train_args


def jobs_of(db: SimpleNamespace, planned: Sequence[PlannedJob], output_dir: str) -> List[tuple]:
    """(DomainBed Job, label, test envs, trial) of the planned jobs, their states read now."""
    return [(db.sweep.Job(a, output_dir), label, envs, trial) for a, label, envs, trial in planned]


def to_launch(db: SimpleNamespace, planned: Sequence[PlannedJob], output_dir: str) -> List[list]:
    """The jobs not launched yet, grouped by (test envs, trial): the units of the evaluation."""
    units: Dict[Tuple[Tuple[int, ...], int], list] = {}
    for job, _, test_envs, trial in jobs_of(db, planned, output_dir):
        if job.state == db.sweep.Job.NOT_LAUNCHED:
            units.setdefault((test_envs, trial), []).append(job)
    return list(units.values())


def launch(db: SimpleNamespace, units: Sequence[list], launcher: str, progress: bool) -> None:
    """Launch the units one (test envs, trial) at a time, with a progress bar: DomainBed's launch
    shuffles the jobs it is given, and an interrupted evaluation should leave whole pairs.
    `local` is our stoppable local launcher: an interruption (Ctrl-C, SIGTERM) stops the job
    that runs, its children included, and each job's output goes to its folder."""
    os.environ["PYTHONPATH"] = with_pythonpath(db.checkout)["PYTHONPATH"]  # the jobs inherit it
    local = launcher == "local"
    launcher_fn = make_local_launcher() if local else db.launchers.REGISTRY[launcher]
    for unit in tqdm(units, desc="evaluate", unit="unit", disable=not progress):
        launch_jobs(db.sweep.Job, unit, launcher_fn, quiet=local)


def collect(db: SimpleNamespace, planned: Sequence[PlannedJob],
            output_dir: str) -> Tuple[List[Dict[str, Any]], List[str], List[str]]:
    """(one record per finished job and test env, the jobs not finished, the damaged records
    skipped).

    A record: loss, unit (the trial), domain (the test env), the test and validation accuracy
    of the checkpoint training-domain validation selects, and the last checkpoint's test
    accuracy. DomainBed's reporting.load_records stops at the first damaged line; this skips
    and lists it.
    """
    found, damaged = records_of(load_runs(output_dir))
    results, records, missing = db.query.Q(found), [], []
    for job, label, test_envs, trial in jobs_of(db, planned, output_dir):
        folder = Path(job.output_dir)
        runs = results.filter(lambda r, name=folder.name: Path(r["args"]["output_dir"]).name == name)
        if not (folder / "done").exists() or not len(runs):
            envs = " ".join(map(str, test_envs))
            missing.append(f"{label}, test env {envs}, trial {trial}: {folder} ({job.state})")
            continue
        chosen, val_acc = training_domain_validation(list(runs), test_envs)
        last = max(runs, key=lambda r: r["step"])
        records += [{"loss": label, "unit": trial, "domain": f"env{e}",
                     "test_acc": chosen[f"env{e}_in_acc"], "val_acc": val_acc,
                     "last_test_acc": last[f"env{e}_in_acc"], "steps": last["step"] + 1,
                     "folder": folder.name} for e in test_envs]
    return records, missing, damaged


def training_domain_validation(checkpoints: Sequence[Dict[str, Any]],
                               test_envs: Sequence[int]) -> Tuple[Dict[str, Any], float]:
    """(the checkpoint record with the best mean out-split accuracy over the training
    environments, that accuracy): DomainBed's IIDAccuracySelectionMethod, which with one test
    environment picks the same checkpoint, and which with several would count the other test
    environments as validation; the first best on ties, as its argmax."""
    def val_acc(record: Dict[str, Any]) -> float:
        keys = [k for k in record if k.startswith("env") and k.endswith("_out_acc")
                and int(k[3:-len("_out_acc")]) not in test_envs]
        return sum(record[k] for k in keys) / len(keys)

    chosen = max(checkpoints, key=val_acc)
    return chosen, val_acc(chosen)
