"""Aggregating the per-domain hypergradients of one outer step (Sec. 3.3, Algorithm 1 line 15):
interchangeable (n, d) -> (d,) functions; reduction "sum" is Yu et al.'s PCGrad, "mean" divides
by n. See docs/meta_learning.md#how-the-meta-learner-is-built.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum")


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
