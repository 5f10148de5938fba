"""DomainBed algorithms whose supervised cross-entropy is replaced by another loss.

See docs/domainbed.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from ..losses import zoo
from ..losses.checks import LossCheckError, check_minimisable
from ..losses.lossfile import LOSS_PRESETS, LossFileError, resolve_loss

SupervisedLoss = Callable[..., Tensor]
HparamDef = Tuple[str, Any, Callable[[np.random.RandomState], Any]]


class LossHparamError(ValueError):
    """A loss hparam, or the loss it makes, that cannot train; the message names the hparam, its
    value and what is expected."""


class NonFiniteTrainingError(FloatingPointError):
    """A training step of one of our algorithms returned a non-finite value."""


@dataclass(frozen=True)
class Loss:
    """A supervised loss of our algorithms: its builder from DomainBed hparams, its own hparams
    (name, default, random-search draw, as DomainBed's `_hparam` takes them), the algorithms
    that train with it (name -> the DomainBed algorithm it replaces the CE of), and the check
    of its hparams' values (raises LossHparamError)."""

    build: Callable[[Mapping], SupervisedLoss]
    hparams: Tuple[HparamDef, ...]
    algorithms: Mapping[str, str]
    check: Callable[[Mapping], None] = lambda hparams: None


def _number(hparams: Mapping, name: str, accept: Callable[[float], bool], expected: str) -> float:
    """hparams[name] as a float, if it is a finite number that `accept`s; else LossHparamError."""
    value = hparams[name]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not accept(float(value))):
        raise LossHparamError(f"hparam {name}={value!r}: expected {expected}")
    return float(value)


def _check_sce_weights(alpha: float, beta: float, where: str) -> None:
    if alpha < 0 or beta < 0 or alpha + beta == 0:
        raise LossHparamError(f"{where}: SCE weights alpha={alpha!r}, beta={beta!r}: expected both "
                              ">= 0 and not both 0 (a negative weight makes its term one that "
                              "training maximises)")


def _check_focal(hparams: Mapping) -> None:
    _number(hparams, "focal_gamma", lambda g: g >= 0,
            "a number >= 0 (the focusing parameter; 0 is cross-entropy)")


def _check_sce(hparams: Mapping) -> None:
    alpha = _number(hparams, "sce_alpha", lambda a: True, "a finite number >= 0")
    beta = _number(hparams, "sce_beta", lambda b: True, "a finite number >= 0")
    _check_sce_weights(alpha, beta, "hparams sce_alpha and sce_beta")


def _check_gce(hparams: Mapping) -> None:
    _number(hparams, "gce_q", lambda q: 0 < q <= 1, "a number in (0, 1]")


def _check_ls(hparams: Mapping) -> None:
    _number(hparams, "ls_epsilon", lambda e: 0 <= e < 1, "a number in [0, 1)")


def _check_poly1(hparams: Mapping) -> None:
    _number(hparams, "poly_epsilon", lambda e: e >= -1, "a number >= -1 (Leng et al.'s range: -1 "
            "removes the linear term, 0 is cross-entropy)")


def _check_itl(hparams: Mapping) -> None:
    value = hparams["itl_loss"]
    expected = f"a preset loss ({', '.join(LOSS_PRESETS)}) or the path of a loss file"
    if not isinstance(value, str):
        raise LossHparamError(f"hparam itl_loss={value!r}: expected {expected}")
    if value not in LOSS_PRESETS and not os.path.exists(value):
        raise LossHparamError(f"hparam itl_loss={value!r} is neither a preset loss nor an existing "
                              f"file; expected {expected}")
    try:
        spec = resolve_loss(value)
    except LossFileError as error:
        raise LossHparamError(f"hparam itl_loss={value!r}: {error}") from None
    if spec.family == "sce":
        _check_sce_weights(*spec.parameters, f"hparam itl_loss={value!r}")


# Random search for a loss parameter draws around its published value.
LOSSES: Dict[str, Loss] = {
    # Table 8's learned loss (a preset name) or a loss file's path; random search keeps it fixed.
    # ERM with it is the paper's ITL-Net; inside other CE-based DG algorithms: Table 1's RSC + ITL
    # and the others.
    "ITL": Loss(lambda h: resolve_loss(h["itl_loss"]).module(),
                (("itl_loss", "ITL", lambda r: "ITL"),),
                {"ITL": "ERM", "RSC_ITL": "RSC", "CORAL_ITL": "CORAL", "SagNet_ITL": "SagNet",
                 "Mixup_ITL": "Mixup", "Fish_ITL": "Fish"}, _check_itl),
    "BCE": Loss(lambda h: zoo.bce, (), {"ERM_BCE": "ERM"}),
    # Lin et al. (2017) try γ in [0, 5] and recommend 2.
    "Focal": Loss(lambda h: functools.partial(zoo.focal, gamma=float(h["focal_gamma"])),
                  (("focal_gamma", 2.0, lambda r: float(r.choice([0.5, 1.0, 2.0, 3.0, 5.0]))),),
                  {"ERM_Focal": "ERM"}, _check_focal),
    # Wang et al. (2019): α = 0.1, β = 1.0 on CIFAR-10; α in [0.01, 1], β in [0.1, ~3].
    "SCE": Loss(lambda h: functools.partial(zoo.sce, alpha=float(h["sce_alpha"]),
                                            beta=float(h["sce_beta"])),
                (("sce_alpha", 0.1, lambda r: float(10 ** r.uniform(-2, 0))),
                 ("sce_beta", 1.0, lambda r: float(10 ** r.uniform(-1, 0.5)))),
                {"ERM_SCE": "ERM"}, _check_sce),
    # Zhang & Sabuncu (2018): q = 0.7.
    "GCE": Loss(lambda h: functools.partial(zoo.gce, q=float(h["gce_q"])),
                (("gce_q", 0.7, lambda r: float(r.uniform(0.4, 0.9))),),
                {"ERM_GCE": "ERM"}, _check_gce),
    # Szegedy et al. (2016): ε = 0.1.
    "LS": Loss(lambda h: functools.partial(zoo.label_smoothing, epsilon=float(h["ls_epsilon"])),
               (("ls_epsilon", 0.1, lambda r: float(r.uniform(0.0, 0.3))),),
               {"ERM_LS": "ERM"}, _check_ls),
    # Leng et al. (2022): ε = 2 for ImageNet classification, -1 for COCO detection; ε >= -1.
    "Poly1": Loss(lambda h: functools.partial(zoo.poly1, epsilon=float(h["poly_epsilon"])),
                  (("poly_epsilon", 2.0, lambda r: float(r.uniform(-1.0, 3.0))),),
                  {"ERM_Poly1": "ERM"}, _check_poly1),
}


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm: DomainBed base algorithm `base` trained with loss `loss`."""

    name: str
    base: str
    loss: str


# Every algorithm of the table, by name.
LOSS_ALGORITHMS: Dict[str, AlgorithmSpec] = {
    name: AlgorithmSpec(name, base, loss)
    for loss, entry in LOSSES.items() for name, base in entry.algorithms.items()}


# The DomainBed algorithm that trains with each zoo loss (losses.zoo): ERM for cross-entropy, else
# the ERM-based algorithm of the loss in LOSSES.
ZOO_ALGORITHMS: Dict[str, str] = {"CE": "ERM", **{
    loss: name for loss, entry in LOSSES.items() if loss in zoo.ZOO
    for name, base in entry.algorithms.items() if base == "ERM"}}


def check_loss_hparams(algorithm: str, hparams: Mapping,
                       num_classes: Optional[int] = None) -> SupervisedLoss:
    """The supervised loss of our `algorithm` under `hparams`, checked; LossHparamError if not.

    Loss hparams missing from `hparams` take their defaults. With `num_classes`, the built loss
    must also be finite and minimisable for that many classes (losses.checks).
    """
    return _checked_loss(LOSS_ALGORITHMS[algorithm].loss, algorithm, hparams, num_classes)


def _checked_loss(loss: str, algorithm: str, hparams: Mapping,
                  num_classes: Optional[int]) -> SupervisedLoss:
    entry = LOSSES[loss]
    values = {name: hparams.get(name, default) for name, default, _ in entry.hparams}
    try:
        entry.check(values)
        built = entry.build(values)
        if num_classes is not None:
            described = ", ".join(f"{k}={v!r}" for k, v in values.items())
            check_minimisable(built, num_classes, f"the {loss} loss"
                              + (f" of hparams {described}" if described else ""))
    except (LossHparamError, LossCheckError) as error:
        raise LossHparamError(f"algorithm {algorithm}: {error}") from None
    return built


def _check_finite(algorithm: str, result: Mapping[str, Any], update: int, loss: str) -> None:
    bad = {k: v for k, v in result.items()
           if isinstance(v, (int, float)) and not math.isfinite(v)}
    if bad:
        values = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise NonFiniteTrainingError(
            f"algorithm {algorithm}: update {update} returned {values}; stopping instead of "
            f"training on non-finite values ({loss}); a smaller learning rate or another loss "
            "may train")


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

    loss_hparams = [h[0] for h in LOSSES[loss].hparams]

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        checked = _checked_loss(loss, name, hparams, num_classes)  # before building any network
        base.__init__(self, input_shape, num_classes, num_domains, hparams)
        self.supervised_loss = checked
        self._domainbed_itl_updates = 0
        self._domainbed_itl_loss = ", ".join(f"{h}={hparams[h]!r}" for h in loss_hparams
                                             if h in hparams) or f"the {loss} loss"

    def update(self, minibatches, unlabeled=None):
        with supervised_loss(base.update.__module__, self.supervised_loss):
            result = base.update(self, minibatches, unlabeled)
        self._domainbed_itl_updates += 1
        _check_finite(name, result, self._domainbed_itl_updates, self._domainbed_itl_loss)
        return result

    doc = f"{base.__name__} with its cross-entropy replaced by the {loss} loss (domainbed-itl)."
    return type(name, (base,), {"__init__": __init__, "update": update, "__doc__": doc,
                                "__module__": __name__, "__qualname__": name})
