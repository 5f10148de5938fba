"""Is a supervised loss one to minimise? Finite, and lower for a more probable true class somewhere.

See docs/losses.md.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from . import cpu_kernel

GRID = 101
P_MIN = 1e-4


class LossCheckError(ValueError):
    """A loss that is not finite on the probability simplex, or that would be maximised."""


def loss_along_p_true(loss: Callable[..., Tensor], num_classes: int, points: int = GRID,
                      dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
    """(p_true, loss, d loss / d p_true) at `points` values of p_true in [P_MIN, 1 - P_MIN]."""
    if num_classes < 2:
        raise ValueError(f"a classification loss needs at least 2 classes, got {num_classes}")
    p = torch.linspace(P_MIN, 1 - P_MIN, points, dtype=dtype, requires_grad=True)
    others = ((1 - p) / (num_classes - 1)).unsqueeze(1).expand(-1, num_classes - 1)
    logits = torch.cat([p.unsqueeze(1), others], dim=1).log()
    with cpu_kernel.disabled():  # these CPU logits must not make a GPU job build the kernel
        values = loss(logits, torch.zeros(points, dtype=torch.long), reduction="none")
    (slopes,) = torch.autograd.grad(values.sum(), p)
    return p.detach(), values.detach(), slopes


def check_minimisable(loss: Callable[..., Tensor], num_classes: int, what: str = "the loss") -> None:
    """Raise LossCheckError, naming `what`, unless `loss` is finite along p_true and decreases
    somewhere (docs/losses.md)."""
    p, values, slopes = loss_along_p_true(loss, num_classes)
    for name, tensor in (("value", values), ("slope d loss/d p_true", slopes)):
        bad = ~torch.isfinite(tensor)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise LossCheckError(f"{what} is not finite: its {name} is {tensor[i].item()} at "
                                 f"p_true = {p[i].item():.4f} ({num_classes} classes); expected "
                                 "finite values for every true-class probability")
    if bool((slopes >= 0).all()):
        raise LossCheckError(
            f"{what} would be maximised, not minimised: it never decreases as the true-class "
            f"probability grows (d loss/d p_true >= 0 at every p_true in [{P_MIN:g}, "
            f"{1 - P_MIN:g}], {num_classes} classes; loss {values[0].item():.4g} at p_true = "
            f"{P_MIN:g}, {values[-1].item():.4g} at {1 - P_MIN:g}); expected a loss that falls as "
            "the true class becomes more probable (a Taylor loss's parameters are read in Table "
            "8's orientation: the polynomial grows with p_true and its negation is minimised)")
