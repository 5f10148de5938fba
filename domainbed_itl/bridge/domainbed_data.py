"""Meta-training data from DomainBed's own dataset classes; the only meta module importing DomainBed.

Any dataset in domainbed.datasets works by name (default RotatedMNIST, the paper's meta-training
set). Every environment becomes one domain of flattened float images and long labels.

See docs/meta_learning.md.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Set

import torch
from torch.utils.data import TensorDataset

from .domainbed_env import import_domainbed
from ..meta.data import DomainData

# torchvision's MNIST files, which DomainBed's MNIST datasets read from <data_dir>/MNIST/raw.
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


class DataUnavailable(FileNotFoundError):
    """A DomainBed dataset that is not in --data_dir and could not be downloaded there."""


def _folders(root: Path, depth: int) -> Set[Path]:
    """The folders under `root`, `depth` levels deep at most."""
    found: Set[Path] = set()
    level = [root]
    for _ in range(depth):
        level = [p for folder in level if folder.is_dir() for p in folder.iterdir() if p.is_dir()]
        found.update(level)
    return found


@contextlib.contextmanager
def no_new_folders_on_error(root: str | os.PathLike, depth: int = 3) -> Iterator[None]:
    """On an exception in the block, remove the empty folders it made under `root` (a download
    that failed, as torchvision's MNIST offline, leaves <root>/MNIST/raw behind)."""
    root = Path(root)
    before = _folders(root, depth)
    try:
        yield
    except BaseException:
        for made in sorted(_folders(root, depth) - before, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # one holding files stays
                made.rmdir()
        raise


def mnist_instructions(data_dir: str | os.PathLike, reason: str) -> str:
    """Why MNIST is not in `data_dir`, and which files to put where."""
    from torchvision.datasets import MNIST

    raw = Path(data_dir).resolve() / "MNIST" / "raw"
    return (f"MNIST is not in {data_dir} and torchvision could not download it ({reason}). Put "
            f"these four files into {raw}/: {', '.join(MNIST_FILES)} (download "
            f"{', '.join(f + '.gz' for f in MNIST_FILES)} from {MNIST.mirrors[0]} on a machine "
            "with internet access and gunzip them), then run the command again.")


def reason_of(error: BaseException) -> str:
    """The last line of an error's message (torchvision's download error ends with the cause)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _construct(datasets: Any, dataset: str, data_dir: str | os.PathLike) -> Any:
    """DomainBed's `dataset` from `data_dir` (downloaded there by DomainBed if it can); on
    failure DataUnavailable says what to put where, and no empty folder is left behind."""
    cls = datasets.get_dataset_class(dataset)
    try:
        with no_new_folders_on_error(data_dir):
            return cls(str(data_dir), [], {"data_augmentation": False})
    except (RuntimeError, OSError) as error:
        if issubclass(cls, getattr(datasets, "MultipleEnvironmentMNIST", ())):
            raise DataUnavailable(f"--dataset {dataset}: "
                                  f"{mnist_instructions(data_dir, reason_of(error))}") from None
        raise DataUnavailable(f"--dataset {dataset} cannot be read from --data_dir {data_dir} "
                              f"({reason_of(error)}); DomainBed's download script puts it there: "
                              f"python -m domainbed.scripts.download --data_dir {data_dir}") from None


def _tensors(dataset: Any, cap: Optional[int], generator: torch.Generator):
    """(x, y) of one DomainBed environment, at most `cap` examples chosen at random."""
    n = len(dataset)
    index = torch.arange(n) if cap is None or cap >= n else torch.randperm(n, generator=generator)[:cap]
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0][index], dataset.tensors[1][index]
    else:
        pairs = [dataset[i] for i in index.tolist()]
        x = torch.stack([p[0] for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    return x.reshape(len(index), -1).float(), y.long()


def load_domainbed_domains(dataset: str = "RotatedMNIST", data_dir: str | os.PathLike = "./data",
                           domainbed_root: Optional[str | os.PathLike] = None,
                           per_domain_cap: Optional[int] = None, seed: int = 0) -> DomainData:
    """Load DomainBed's `dataset` from `data_dir` as per-domain (x flattened, y) tensors.

    domainbed_root: a DomainBed checkout (else `import domainbed` must work); a missing one raises
    DomainBedNotFound with how to get it. per_domain_cap: keep at most this many examples of each
    environment, chosen at random. seed: seeds DomainBed's own random construction (its MNIST
    shuffle and colouring) and the cap's choice, so the data are the same on every call.
    """
    if per_domain_cap is not None and (not isinstance(per_domain_cap, int) or per_domain_cap < 1):
        raise ValueError(f"per_domain_cap must be a positive integer or None, got {per_domain_cap!r}")
    datasets = import_domainbed(domainbed_root, "domainbed.datasets")
    if dataset not in datasets.DATASETS:
        raise ValueError(f"unknown DomainBed dataset {dataset!r}; expected one of "
                         f"{', '.join(datasets.DATASETS)}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data dir {data_dir} does not exist (DomainBed's --data_dir)")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        ds = _construct(datasets, dataset, data_dir)
    generator = torch.Generator().manual_seed(seed)
    domains = [_tensors(env, per_domain_cap, generator) for env in ds]
    return DomainData(dataset, list(ds.ENVIRONMENTS), domains, int(ds.num_classes),
                      tuple(ds.input_shape),
                      {"dataset": dataset, "per_domain_cap": per_domain_cap, "data_seed": seed})
