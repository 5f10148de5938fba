"""DomainBed algorithms whose supervised cross-entropy is replaced by another loss.

`make_loss_algorithm(Base, loss)` subclasses any CE-based DomainBed algorithm without copying
its code: while the base class's own `update` runs, the name `F` in the base's module (DomainBed
writes `F.cross_entropy(...)`) resolves to torch.nn.functional with `cross_entropy` replaced by
the chosen loss. `update`'s signature and returned dict are the base's, unchanged. Only bases
whose every `F.cross_entropy` call is the supervised class loss may be wrapped (DANN's
discriminator loss, for example, is not), which is why `LOSSES` lists them explicitly.
The swap is module-global for the duration of `update`: code calling `domainbed.algorithms.F`
from another thread meanwhile would see it too (DomainBed's training loop is single-threaded).

This module does not import DomainBed: the registry hands it DomainBed's classes.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from .losses import zoo
from .losses.lossfile import resolve_loss

SupervisedLoss = Callable[..., Tensor]
HparamDef = Tuple[str, Any, Callable[[np.random.RandomState], Any]]


@dataclass(frozen=True)
class Loss:
    """A supervised loss of our algorithms: its builder from DomainBed hparams, its own hparams
    (name, default, random-search draw, as DomainBed's `_hparam` takes them), and the
    algorithms that train with it (name -> the DomainBed algorithm it replaces the CE of)."""

    build: Callable[[Mapping], SupervisedLoss]
    hparams: Tuple[HparamDef, ...]
    algorithms: Mapping[str, str]


# Random search for a loss parameter draws around its published value.
LOSSES: Dict[str, Loss] = {
    # Table 8's learned loss (a preset name) or a loss file's path; random search keeps it fixed.
    # ERM with it is the paper's ITL-Net; inside other CE-based DG algorithms: Table 1's RSC + ITL
    # and the others.
    "ITL": Loss(lambda h: resolve_loss(h["itl_loss"]).module(),
                (("itl_loss", "ITL", lambda r: "ITL"),),
                {"ITL": "ERM", "RSC_ITL": "RSC", "CORAL_ITL": "CORAL", "SagNet_ITL": "SagNet",
                 "Mixup_ITL": "Mixup", "Fish_ITL": "Fish"}),
    "BCE": Loss(lambda h: zoo.bce, (), {"ERM_BCE": "ERM"}),
    # Lin et al. (2017) try γ in [0, 5] and recommend 2.
    "Focal": Loss(lambda h: functools.partial(zoo.focal, gamma=float(h["focal_gamma"])),
                  (("focal_gamma", 2.0, lambda r: float(r.choice([0.5, 1.0, 2.0, 3.0, 5.0]))),),
                  {"ERM_Focal": "ERM"}),
    # Wang et al. (2019): α = 0.1, β = 1.0 on CIFAR-10; α in [0.01, 1], β in [0.1, ~3].
    "SCE": Loss(lambda h: functools.partial(zoo.sce, alpha=float(h["sce_alpha"]),
                                            beta=float(h["sce_beta"])),
                (("sce_alpha", 0.1, lambda r: float(10 ** r.uniform(-2, 0))),
                 ("sce_beta", 1.0, lambda r: float(10 ** r.uniform(-1, 0.5)))),
                {"ERM_SCE": "ERM"}),
    # Zhang & Sabuncu (2018): q = 0.7.
    "GCE": Loss(lambda h: functools.partial(zoo.gce, q=float(h["gce_q"])),
                (("gce_q", 0.7, lambda r: float(r.uniform(0.4, 0.9))),),
                {"ERM_GCE": "ERM"}),
    # Szegedy et al. (2016): ε = 0.1.
    "LS": Loss(lambda h: functools.partial(zoo.label_smoothing, epsilon=float(h["ls_epsilon"])),
               (("ls_epsilon", 0.1, lambda r: float(r.uniform(0.0, 0.3))),),
               {"ERM_LS": "ERM"}),
}


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm: DomainBed base algorithm `base` trained with loss `loss`."""

    name: str
    base: str
    loss: str


# Every algorithm of the table, by name.
ALGORITHMS: Dict[str, AlgorithmSpec] = {
    name: AlgorithmSpec(name, base, loss)
    for loss, entry in LOSSES.items() for name, base in entry.algorithms.items()}


class _FunctionalWithLoss:
    """torch.nn.functional, except that cross_entropy(input, target, reduction=) is `loss`."""

    def __init__(self, loss: SupervisedLoss):
        self._loss = loss

    def __getattr__(self, name: str):
        return getattr(F, name)

    def cross_entropy(self, input: Tensor, target: Tensor, *args, reduction: str = "mean",
                      **kwargs) -> Tensor:
        if args or kwargs:
            raise TypeError(
                "the replaced cross_entropy supports only (input, target, reduction=...); "
                f"got extra arguments {args or ''}{kwargs or ''}")
        return self._loss(input, target, reduction=reduction)


_swap_lock = threading.RLock()


@contextlib.contextmanager
def supervised_loss(module_name: str, loss: SupervisedLoss) -> Iterator[None]:
    """Within the block, `F.cross_entropy` in module `module_name` calls `loss` instead."""
    module = sys.modules[module_name]
    with _swap_lock:
        original = module.F
        module.F = _FunctionalWithLoss(loss)
        try:
            yield
        finally:
            module.F = original


def make_loss_algorithm(base: type, loss: str, name: str) -> type:
    """A subclass of DomainBed algorithm `base` named `name` whose supervised loss is `loss`."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        base.__init__(self, input_shape, num_classes, num_domains, hparams)
        self.supervised_loss = LOSSES[loss].build(hparams)

    def update(self, minibatches, unlabeled=None):
        with supervised_loss(base.update.__module__, self.supervised_loss):
            return base.update(self, minibatches, unlabeled)

    doc = f"{base.__name__} with its cross-entropy replaced by the {loss} loss (domainbed-itl)."
    return type(name, (base,), {"__init__": __init__, "update": update, "__doc__": doc,
                                "__module__": __name__, "__qualname__": name})
