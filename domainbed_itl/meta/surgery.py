"""Aggregating the per-domain hypergradients of one outer step (Sec. 3.3, Algorithm 1 line 15).

Both aggregators take the stacked gradients (n, d) and a torch.Generator and return a (d,) tensor,
so they are interchangeable. Both return a *mean*, so the outer learning rate means the same
with either.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _check_grads(grads: Tensor) -> None:
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"expected stacked gradients of shape (n >= 1, d), got {tuple(grads.shape)}")


def mean(grads: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """The plain mean of the n gradients (the generator is unused)."""
    _check_grads(grads)
    return grads.mean(dim=0)


def pcgrad(grads: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """PCGrad (Yu et al., NeurIPS 2020): project away pairwise conflicts, then average.

    For each g_i, visit the other original g_j in a random order (drawn from `generator`, on the
    CPU) and, whenever g_i^PC · g_j < 0, replace g_i^PC by g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j.
    Yu et al.'s Algorithm 1 sums the projected g_i^PC; this returns their mean instead, the scale
    of `mean`, which it equals when no pair conflicts.
    """
    _check_grads(grads)
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
    return torch.stack(projected).mean(dim=0)


AGGREGATORS = {"pcgrad": pcgrad, "mean": mean}
