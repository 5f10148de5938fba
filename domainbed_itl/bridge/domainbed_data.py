"""Meta-training data from DomainBed's own dataset classes; the only meta module importing DomainBed.

Any dataset in domainbed.datasets works by name (default RotatedMNIST, the paper's meta-training
set). Every environment becomes one domain of flattened float images and long labels.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch.utils.data import TensorDataset

from .domainbed_env import import_domainbed
from ..meta.data import DomainData


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
        ds = datasets.get_dataset_class(dataset)(str(data_dir), [], {"data_augmentation": False})
    generator = torch.Generator().manual_seed(seed)
    domains = [_tensors(env, per_domain_cap, generator) for env in ds]
    return DomainData(dataset, list(ds.ENVIRONMENTS), domains, int(ds.num_classes),
                      tuple(ds.input_shape),
                      {"dataset": dataset, "per_domain_cap": per_domain_cap, "data_seed": seed})
