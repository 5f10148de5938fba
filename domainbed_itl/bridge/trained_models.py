"""Trained DomainBed models for the analyses: run folders, their checkpoints, and their data.

See docs/analyses.md.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from .domainbed_env import import_domainbed
from ..files.reading import UnreadableFile, load_tensors, read_text
from ..files.sweepfolder import mixed_runs
from ..losses.taylor import TaylorLoss, taylor_loss

_STEP_FILE = re.compile(r"model_step(\d+)\.pkl")

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar

# DomainBed's random hparams hold numpy scalars (e.g. resnet_dropout = r.choice([0., 0.1, 0.5])):
# what a checkpoint may hold beyond tensors and Python builtins, for torch.load(weights_only=True).
_NUMPY_SCALARS = [_numpy_scalar, np.dtype] + [type(np.dtype(name)) for name in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")]


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used; the message names it."""


@dataclass(frozen=True)
class Checkpoint:
    """A saved model of a run, at training step `step` (None: not known)."""

    path: Path
    step: Optional[int]


@dataclass(frozen=True)
class TrainedRun:
    """A DomainBed run folder and its checkpoints, ordered by step (model.pkl last)."""

    folder: Path
    checkpoints: Tuple[Checkpoint, ...]

    @property
    def final(self) -> Checkpoint:
        """model.pkl when present, else the checkpoint of the latest step."""
        return self.checkpoints[-1]

    @property
    def steps(self) -> Tuple[Checkpoint, ...]:
        """The model_step{N}.pkl checkpoints, or the final model alone when there are none."""
        stepped = tuple(c for c in self.checkpoints if c.path.name != "model.pkl")
        return stepped or (self.final,)


def _last_step(folder: Path) -> Optional[int]:
    """The step of the last record of folder/results.jsonl (that of model.pkl), if readable and
    of one run (a file that mixes runs says nothing sure about model.pkl)."""
    try:
        text = read_text(folder / "results.jsonl", what="results file")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not records or not all(isinstance(r, dict) for r in records) or mixed_runs(records):
            return None
        return int(records[-1]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_of(folder: Path) -> Optional[TrainedRun]:
    checkpoints = [Checkpoint(p, int(_STEP_FILE.fullmatch(p.name).group(1)))
                   for p in folder.glob("model_step*.pkl") if _STEP_FILE.fullmatch(p.name)]
    checkpoints.sort(key=lambda c: c.step)
    if (folder / "model.pkl").is_file():
        checkpoints.append(Checkpoint(folder / "model.pkl", _last_step(folder)))
    return TrainedRun(folder, tuple(checkpoints)) if checkpoints else None


def find_runs(paths: Iterable[str | os.PathLike]) -> List[TrainedRun]:
    """The runs under `paths`: model .pkl files, run folders, or folders searched recursively.

    Raises RunError naming a path that does not exist or holds no checkpoint.
    """
    runs: Dict[Path, TrainedRun] = {}
    for given in paths:
        path = Path(given)
        if path.is_file():
            if path.suffix != ".pkl":
                raise RunError(f"{path} is not a DomainBed checkpoint (model.pkl or model_step<N>.pkl)")
            match = _STEP_FILE.fullmatch(path.name)
            step = int(match.group(1)) if match else _last_step(path.parent)
            runs.setdefault(path.resolve(), TrainedRun(path.parent, (Checkpoint(path, step),)))
            continue
        if not path.is_dir():
            raise RunError(f"{path} does not exist")
        folders = sorted({p.parent for p in path.rglob("model*.pkl")})
        found = [run for run in map(_run_of, folders) if run is not None]
        if not found:
            raise RunError(f"{path} holds no DomainBed checkpoint (model.pkl or model_step<N>.pkl); "
                           "train with DomainBed without --skip_model_save, and with "
                           "--save_model_every_checkpoint where the analysis follows training")
        for run in found:
            runs.setdefault(run.folder.resolve(), run)
    return list(runs.values())


class Predictor(nn.Module):
    """A DomainBed algorithm as a module whose forward is its `predict` (for torch.func)."""

    def __init__(self, algorithm: nn.Module):
        super().__init__()
        self.algorithm = algorithm

    def forward(self, x: Tensor) -> Tensor:
        return self.algorithm.predict(x)


@dataclass
class TrainedModel:
    """A DomainBed algorithm loaded from a checkpoint, in eval mode, with the run's settings."""

    algorithm: nn.Module
    args: Dict[str, Any]
    hparams: Dict[str, Any]
    checkpoint: Path

    @property
    def name(self) -> str:
        """The algorithm's DomainBed name."""
        return self.args["algorithm"]

    @property
    def test_envs(self) -> List[int]:
        """The run's test environments."""
        return list(self.args["test_envs"])

    @property
    def label(self) -> str:
        """The algorithm's name, with the loss file's folder when it ran with a learned loss."""
        loss = self.hparams.get("itl_loss")
        if isinstance(loss, str) and loss.endswith(".json"):
            return f"{self.name} ({Path(loss).parent.name or Path(loss).stem})"
        return self.name

    def training_loss(self):
        """The supervised loss the model was trained with, twice differentiable; cross-entropy
        for DomainBed's own algorithms (their extra penalty terms are not included)."""
        loss = getattr(self.algorithm, "supervised_loss", None)
        if loss is None:
            return nn.functional.cross_entropy
        if isinstance(loss, TaylorLoss):  # its fused gradient is first-order only
            omega, order = loss.omega, loss.order
            return lambda logits, target, reduction="mean": taylor_loss(logits, target, omega, order,
                                                                        reduction)
        return loss


def load_model(path: str | os.PathLike, domainbed_root: Optional[str | os.PathLike] = None,
               device: str | torch.device = "cpu") -> TrainedModel:
    """The algorithm saved in DomainBed checkpoint `path`, on `device`, in eval mode."""
    import domainbed_itl

    algorithms = import_domainbed(domainbed_root, "domainbed.algorithms")
    domainbed_itl.register(domainbed_root)
    try:
        saved = load_tensors(path, "DomainBed checkpoint", allowed=_NUMPY_SCALARS,
                             map_location=device)
        args, hparams = saved["args"], saved["model_hparams"]
        algorithm_class = algorithms.get_algorithm_class(args["algorithm"])
        algorithm = algorithm_class(saved["model_input_shape"], saved["model_num_classes"],
                                    saved["model_num_domains"], hparams)
        algorithm.load_state_dict(saved["model_dict"])
    except UnreadableFile as error:  # what weights_only refuses: code, foreign objects
        raise RunError(f"cannot load {error}") from None
    except (OSError, RuntimeError, KeyError, TypeError, NotImplementedError, EOFError) as error:
        raise RunError(f"cannot load the DomainBed checkpoint {path}: {type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}") from error
    algorithm.to(device).eval()
    return TrainedModel(algorithm, dict(args), dict(hparams), Path(path))


@dataclass
class Splits:
    """A run's data: per environment its in-split (training, or the test accuracy of a test
    environment) and out-split (validation), as DomainBed's train.py made them."""

    environments: List[str]
    in_splits: List[Dataset]
    out_splits: List[Dataset]
    test_envs: List[int]
    input_shape: Tuple[int, ...] = ()
    num_classes: int = 0

    @property
    def sources(self) -> List[int]:
        """The training environments."""
        return [i for i in range(len(self.environments)) if i not in self.test_envs]


def rebuild_splits(args: Dict[str, Any], hparams: Dict[str, Any], data_dir: Optional[str] = None,
                   domainbed_root: Optional[str | os.PathLike] = None) -> Splits:
    """The splits of the run with train.py arguments `args` and `hparams`, read from `data_dir`
    (default: the run's own --data_dir). Global random states are left as they were."""
    datasets = import_domainbed(domainbed_root, "domainbed.datasets")
    misc = import_domainbed(domainbed_root, "domainbed.lib.misc")
    data_dir = data_dir or args.get("data_dir")
    if args["dataset"] not in vars(datasets):
        raise RunError(f"DomainBed has no dataset {args['dataset']!r}")
    if data_dir is None or not os.path.isdir(data_dir):
        raise RunError(f"data dir {data_dir!r} of the run is not a folder; pass --data_dir")
    test_envs = list(args["test_envs"])
    clean = {**hparams, "data_augmentation": False}
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(args["seed"])
            np.random.seed(args["seed"])
            torch.manual_seed(args["seed"])
            dataset = vars(datasets)[args["dataset"]](data_dir, test_envs, clean)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    in_splits, out_splits = [], []
    for env_i, env in enumerate(dataset):
        out, in_ = misc.split_dataset(env, int(len(env) * args["holdout_fraction"]),
                                      misc.seed_hash(args["trial_seed"], env_i))
        if env_i in test_envs:
            _, in_ = misc.split_dataset(in_, int(len(in_) * args.get("uda_holdout_fraction", 0)),
                                        misc.seed_hash(args["trial_seed"], env_i))
        in_splits.append(in_)
        out_splits.append(out)
    return Splits(list(dataset.ENVIRONMENTS), in_splits, out_splits, test_envs,
                  tuple(dataset.input_shape), int(dataset.num_classes))


def subsample(dataset: Dataset, limit: Optional[int], seed: int = 0) -> Dataset:
    """At most `limit` examples of `dataset`, chosen at random with `seed` (None: all)."""
    if limit is None or limit >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:limit].tolist())


def batches(dataset: Dataset, batch_size: int = 64,
            device: str | torch.device = "cpu") -> List[Tuple[Tensor, Tensor]]:
    """The (x, y) minibatches of `dataset` in order, on `device`."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    return [(x.to(device), y.to(device)) for x, y in loader]


@torch.no_grad()
def predict(algorithm: nn.Module, datasets: Sequence[Dataset], batch_size: int = 64,
            device: str | torch.device = "cpu") -> Tuple[Tensor, Tensor]:
    """(logits, labels) of `algorithm.predict` over the concatenation of `datasets`."""
    logits, labels = [], []
    for dataset in datasets:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            logits.append(algorithm.predict(x.to(device)).float().cpu())
            labels.append(y.long())
    if not labels:
        raise RunError("no data to predict on")
    return torch.cat(logits), torch.cat(labels)


def selected_models(runs: Sequence[TrainedRun], algorithms: Optional[Sequence[str]],
                    domainbed_root: Optional[str], device: str,
                    data_dir: Optional[str]) -> Iterator[Tuple[TrainedRun, "TrainedModel", "Splits"]]:
    """(run, its model at the final checkpoint, its splits) for each run of `algorithms` (None:
    all), in order; the splits are rebuilt from `data_dir` (None: each run's own)."""
    for run in runs:
        model = load_model(run.final.path, domainbed_root, device)
        if algorithms is not None and model.name not in algorithms:
            continue
        splits = rebuild_splits(model.args, model.hparams, data_dir, domainbed_root)
        yield run, model, splits


def describe_run(run: TrainedRun, model: "TrainedModel") -> Dict[str, Any]:
    """The identifying fields of a run in the analyses' outputs."""
    return {"run": str(run.folder), "algorithm": model.name, "label": model.label,
            "dataset": model.args["dataset"], "test_envs": model.test_envs,
            "trial_seed": model.args.get("trial_seed"), "hparams_seed": model.args.get("hparams_seed")}
