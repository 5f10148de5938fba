"""Meta-objectives M: what the search minimises on each held-out domain (Eq. 2's M), in a registry
that users extend with their own (`register_objective`, DOMAINBED_ITL_OBJECTIVES), like the loss
families.

See docs/objectives.md#the-objectives.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

PLUGINS_ENV = "DOMAINBED_ITL_OBJECTIVES"
ObjectiveFn = Callable[[Tensor, Tensor], Tensor]
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The inverse temperatures calibrated_ce searches: T in [1/100, 100].
LOG_BETA_RANGE = (-math.log(100.0), math.log(100.0))
BISECTION_STEPS = 50  # halves the range 50 times: ~1e-14 of its width, below float precision


@dataclass(frozen=True)
class Objective:
    """A meta-objective: its name, the function (logits, labels) -> scalar tensor (minimised),
    and a sentence on what it rewards (shown by --help and in the docs)."""

    name: str
    fn: ObjectiveFn
    rewards: str = ""

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"objective {self.name}: expected logits (n, C) and labels (n,), got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        return self.fn(logits, labels)


def heldout_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy −log softmax(z)_y: the paper's M (Eq. 2). Lower for a right answer and
    for a confident one, so a loss that makes networks less confident (label smoothing) raises it
    even where it raises accuracy."""
    return F.cross_entropy(logits, labels.long())


def _ce_slope(logits: Tensor, labels: Tensor, log_beta: Tensor) -> Tensor:
    """d/dβ of mean CE(β·z): mean over examples of E_softmax(βz)[z] − z_y (increasing in β)."""
    z = logits * log_beta.exp()
    expected = (z.softmax(dim=1) * logits).sum(dim=1)
    return (expected - logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)).mean()


def optimal_log_inverse_temperature(logits: Tensor, labels: Tensor) -> Tensor:
    """log β* = −log T*, where β* = argmin over β in [1/100, 100] of mean CE(β·z, y): bisection on
    the slope, which increases with β because CE(β·z) is convex in β. Detached; a fixed number of
    steps and no Python branch on values, so it runs under torch.func.grad and vmap."""
    with torch.no_grad():
        z = logits.detach()
        low = torch.full((), LOG_BETA_RANGE[0], dtype=z.dtype, device=z.device)
        high = torch.full((), LOG_BETA_RANGE[1], dtype=z.dtype, device=z.device)
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            rising = _ce_slope(z, labels, middle) > 0
            low, high = torch.where(rising, low, middle), torch.where(rising, middle, high)
        return (low + high) / 2


def calibrated_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy at the temperature that minimises it on these examples:
    min over T of mean CE(z / T, y), T in [1/100, 100] (temperature scaling, Guo et al., ICML 2017,
    fitted on the held-out domain itself). The logits' scale no longer counts, so it rewards
    ranking the true class high, not confidence. Its gradient in the logits is CE's at T* with T*
    held fixed: by the envelope theorem (Danskin's, where T* is at an end of the range) the
    solve's own dependence on the logits contributes nothing."""
    beta = optimal_log_inverse_temperature(logits, labels).exp()
    return F.cross_entropy(logits * beta, labels.long())


def soft_error(logits: Tensor, labels: Tensor, tau: float = 0.25) -> Tensor:
    """Smooth error rate: mean sigmoid(−m / τ) of the normalised margin m = (z_y − max_{c≠y} z_c)
    / std_c(z), each example's margin in units of its own logits' spread. τ → 0 gives the error
    rate; the value and its gradient ignore each example's logit scale and shift, so it rewards
    putting the true class on top by a clear margin, not confidence, and examples far from the
    decision boundary contribute little."""
    onehot = torch.arange(logits.shape[1], device=logits.device) == labels.long().unsqueeze(1)
    true = logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    other = torch.where(onehot, torch.full_like(logits, -math.inf), logits).max(dim=1).values
    spread = (logits.var(dim=1, unbiased=False) + 1e-12).sqrt()
    return torch.sigmoid(-(true - other) / (spread * tau)).mean()


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """The fraction of examples whose largest logit is the label's (detached)."""
    return (logits.detach().argmax(dim=1) == labels).to(logits.dtype).mean()


def objective_and_accuracy(objective: Objective | str, logits: Tensor,
                           labels: Tensor) -> Tuple[Tensor, Tensor]:
    """(M, held-out accuracy) on one held-out domain: M differentiable in the logits, accuracy
    detached. Inside torch.func.grad_and_value(..., has_aux=True) return M and keep the accuracy
    as aux."""
    if isinstance(objective, str):
        objective = get_objective(objective)
    return objective(logits, labels), accuracy(logits, labels)


BUILT_IN = (
    Objective("heldout_ce", heldout_ce, "accuracy and calibration alike (the paper's M)"),
    Objective("calibrated_ce", calibrated_ce,
              "ranking the true class high, whatever the logits' scale (CE at the best temperature)"),
    Objective("soft_error", soft_error,
              "the true class on top by a clear margin in units of the logits' spread (smooth error rate)"),
)
_REGISTRY: Dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Register `objective` under its name; the same objective again is a no-op, another under a
    taken name raises ValueError. Returns `objective`."""
    if not isinstance(objective, Objective):
        raise TypeError(f"register an Objective, got {objective!r}")
    if not isinstance(objective.name, str) or not _NAME.fullmatch(objective.name):
        raise ValueError(f"objective name {objective.name!r}: expected letters, digits and '_', not "
                         "starting with a digit")
    if _REGISTRY.setdefault(objective.name, objective) != objective:
        raise ValueError(f"another objective is already registered as {objective.name!r}; register "
                         "yours under another name")
    return objective


def _import_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"{PLUGINS_ENV} names the module {module!r}, which cannot be imported: "
                             f"{error}") from error


def objective_names() -> Tuple[str, ...]:
    """The registered objective names, sorted."""
    _import_plugins()
    return tuple(sorted(_REGISTRY))


def get_objective(name: str) -> Objective:
    """The registered objective `name`; ValueError naming the known ones otherwise."""
    _import_plugins()
    objective = _REGISTRY.get(name)
    if objective is None:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(objective_names())} "
                         f"(one of your own is known where it is registered; other processes import "
                         f"it from the modules named in {PLUGINS_ENV})")
    return objective


for _objective in BUILT_IN:
    register_objective(_objective)
