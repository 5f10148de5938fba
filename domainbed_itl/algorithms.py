"""DomainBed algorithms whose supervised cross-entropy is replaced by another loss.

`make_loss_algorithm(Base, loss)` subclasses any CE-based DomainBed algorithm without copying
its code: while the base class's own `update` runs, the name `F` in the base's module (DomainBed
writes `F.cross_entropy(...)`) resolves to torch.nn.functional with `cross_entropy` replaced by
the chosen loss. `update`'s signature and returned dict are the base's, unchanged. Only bases
whose every `F.cross_entropy` call is the supervised class loss may be wrapped (DANN's
discriminator loss, for example, is not), which is why `ALGORITHM_SPECS` lists them explicitly.
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
from typing import Callable, Dict, Iterator, Mapping

import torch.nn.functional as F
from torch import Tensor

from .losses import zoo
from .losses.lossfile import resolve_loss

SupervisedLoss = Callable[..., Tensor]


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm: DomainBed base algorithm `base` trained with loss `loss`."""

    name: str
    base: str
    loss: str


def _specs(*rows: tuple) -> Dict[str, AlgorithmSpec]:
    return {name: AlgorithmSpec(name, base, loss) for name, base, loss in rows}


# ERM with ITL (the paper's ITL-Net) and with each robust loss of Tables 1 and 3; ITL inside
# other CE-based DG algorithms (Table 1's RSC+ITL and the others of the cluster-sweep issue).
ALGORITHM_SPECS: Dict[str, AlgorithmSpec] = _specs(
    ("ITL", "ERM", "ITL"),
    ("ERM_BCE", "ERM", "BCE"),
    ("ERM_Focal", "ERM", "Focal"),
    ("ERM_SCE", "ERM", "SCE"),
    ("ERM_GCE", "ERM", "GCE"),
    ("ERM_LS", "ERM", "LS"),
    ("RSC_ITL", "RSC", "ITL"),
    ("CORAL_ITL", "CORAL", "ITL"),
    ("SagNet_ITL", "SagNet", "ITL"),
    ("Mixup_ITL", "Mixup", "ITL"),
    ("Fish_ITL", "Fish", "ITL"),
)


def build_loss(loss: str, hparams: Mapping) -> SupervisedLoss:
    """The loss `loss` configured from DomainBed hparams (see hparams.LOSS_HPARAMS)."""
    if loss == "ITL":
        return resolve_loss(hparams["itl_loss"]).module()
    if loss == "BCE":
        return zoo.bce
    if loss == "Focal":
        return functools.partial(zoo.focal, gamma=float(hparams["focal_gamma"]))
    if loss == "SCE":
        return functools.partial(zoo.sce, alpha=float(hparams["sce_alpha"]),
                                 beta=float(hparams["sce_beta"]))
    if loss == "GCE":
        return functools.partial(zoo.gce, q=float(hparams["gce_q"]))
    if loss == "LS":
        return functools.partial(zoo.label_smoothing, epsilon=float(hparams["ls_epsilon"]))
    raise ValueError(f"unknown supervised loss {loss!r}; expected ITL, BCE, Focal, SCE, GCE or LS")


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
        self.supervised_loss = build_loss(loss, hparams)

    def update(self, minibatches, unlabeled=None):
        with supervised_loss(base.update.__module__, self.supervised_loss):
            return base.update(self, minibatches, unlabeled)

    doc = f"{base.__name__} with its cross-entropy replaced by the {loss} loss (domainbed-itl)."
    return type(name, (base,), {"__init__": __init__, "update": update, "__doc__": doc,
                                "__module__": __name__, "__qualname__": name})
