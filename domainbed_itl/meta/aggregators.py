"""Aggregating the per-domain hypergradients of one outer step (Sec. 3.3, Algorithm 1 line 15):
interchangeable (n, d) -> (d,) functions; reduction "sum" is Yu et al.'s PCGrad, "mean" divides
by n. `aggregate` also reports how much of the plain update an aggregator removed, and where it
removed all of it uses the plain update for that step. See docs/objectives.md and
docs/meta_learning.md#how-the-meta-learner-is-built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")
STALL_TOL = 1e-6  # an update below this fraction of the plain one's norm counts as removed whole


def _check(grads: Tensor, reduction: str) -> None:
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"expected stacked gradients of shape (n >= 1, d), got {tuple(grads.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _reduce(grads: Tensor, reduction: str) -> Tensor:
    return grads.sum(dim=0) if reduction == "sum" else grads.mean(dim=0)


def mean(grads: Tensor, generator: Optional[torch.Generator] = None,
         reduction: str = "mean") -> Tensor:
    """The n gradients reduced as they are, no projection (the generator is unused)."""
    _check(grads, reduction)
    return _reduce(grads, reduction)


def pcgrad(grads: Tensor, generator: Optional[torch.Generator] = None,
           reduction: str = "mean") -> Tensor:
    """PCGrad (Yu et al., NeurIPS 2020): project away pairwise conflicts, then sum or average.

    For each g_i, visit the other original g_j in a random order (drawn from `generator`, on the
    CPU) and, whenever g_i^PC · g_j < 0, replace g_i^PC by g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j.
    Yu et al.'s Algorithm 1 sums the projected g_i^PC (`reduction="sum"`); "mean" divides by n.
    """
    _check(grads, reduction)
    n = grads.shape[0]
    sq_norms = (grads * grads).sum(dim=1)
    projected = []
    for i in range(n):
        g = grads[i]
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i:
                continue
            dot = g @ grads[j]
            # Yu et al., Algorithm 1; a zero g_j never conflicts (dot = 0), so its 0/0 is never selected.
            g = g - torch.where(dot < 0, dot / sq_norms[j], torch.zeros_like(dot)) * grads[j]
        projected.append(g)
    return _reduce(torch.stack(projected), reduction)


AGGREGATORS = {"pcgrad": pcgrad, "mean": mean}


@dataclass(frozen=True)
class Aggregate:
    """One step's aggregated hypergradient and what the aggregator did to the plain update.

    removed: 1 − ⟨update, plain⟩/‖plain‖², the fraction of the plain update's component along
    itself that the aggregator took away (0: kept whole, 1: none left; negative where it
    lengthened it); None when the plain update is 0. norm_ratio: ‖update‖/‖plain‖. fallback: why
    the plain update replaced the aggregator's (the rule above), None where it did not."""

    update: Tensor
    removed: Optional[float]
    norm_ratio: Optional[float]
    fallback: Optional[str] = None

    def record(self) -> Dict[str, Any]:
        """The report as JSON-ready fields for a metrics record."""
        return {"aggregator_removed": self.removed, "aggregator_norm_ratio": self.norm_ratio,
                "aggregator_fallback": self.fallback}


def _measure(update: Tensor, plain: Tensor) -> Tuple[Optional[float], Optional[float]]:
    plain_sq = float(plain @ plain)
    if plain_sq == 0.0:
        return None, None
    return 1.0 - float(update @ plain) / plain_sq, float(update.norm()) / plain_sq ** 0.5


def aggregate(name: str, grads: Tensor, generator: Optional[torch.Generator] = None,
              reduction: str = "mean", stall_tol: float = STALL_TOL) -> Aggregate:
    """AGGREGATORS[name](grads, generator, reduction) with its report (Aggregate); where it removed
    the whole update (‖update‖ <= stall_tol·‖plain‖, plain ≠ 0) the plain reduction is used
    instead and `fallback` says why. The generator's draws are those of the aggregator alone."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {', '.join(AGGREGATORS)}")
    update = AGGREGATORS[name](grads, generator, reduction)
    plain = _reduce(grads, reduction)
    removed, ratio = _measure(update, plain)
    if ratio is None or ratio > stall_tol:
        return Aggregate(update, removed, ratio)
    n, d = grads.shape
    note = (f"{name} removed the whole update (norm {ratio:.3g} of the plain {reduction}'s) for {n} "
            f"domains and {d} parameter{'s' if d != 1 else ''}; the plain {reduction} was used")
    return Aggregate(plain, 0.0, 1.0, note)


def aggregator_note(name: str, num_params: int, num_domains: int) -> Optional[str]:
    """A warning for a run whose PCGrad has fewer parameters than domains (None otherwise): there
    any two domains whose hypergradients point apart can cancel each other, and with one
    parameter every step where the domains disagree in sign is cancelled whole."""
    if name != "pcgrad" or num_params >= num_domains:
        return None
    return (f"PCGrad with {num_params} parameter{'s' if num_params != 1 else ''} and {num_domains} "
            "domains: domains whose hypergradients point apart cancel each other, and a step where "
            "they cancel the whole update uses the plain mean instead (recorded as "
            "aggregator_fallback); the mean aggregator makes no projections")
