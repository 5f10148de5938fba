"""A loss and its gradient as functions of the true-class probability (Fig. 5).

See docs/analyses.md.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from ..losses.lossfile import LOSS_PRESETS, load_loss
from ..losses.zoo import ZOO

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class NamedLoss:
    """A loss called like F.cross_entropy(logits, target, reduction=...), with a label."""

    label: str
    fn: LossFn


def _zoo_loss(name: str, params: str, spec: str) -> LossFn:
    fn = ZOO[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("logits", "target", "reduction")]
    kwargs: Dict[str, float] = {}
    for item in filter(None, params.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in allowed:
            raise ValueError(f"loss {spec!r}: {item!r} is not NAME=VALUE with NAME one of "
                             f"{', '.join(allowed) or '(none: ' + name + ' has no parameter)'}")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"loss {spec!r}: {key.strip()} must be a number, got {value!r}") from None
    return functools.partial(fn, **kwargs) if kwargs else fn


def parse_loss(spec: str) -> NamedLoss:
    """The loss named by `spec`: `NAME[:k=v,...]` of the zoo, a preset, or a loss-file path.

    Raises ValueError naming the spec and what is expected (and LossFileError for a bad file).
    """
    name, _, params = spec.partition(":")
    if name in ZOO:
        return NamedLoss(spec, _zoo_loss(name, params, spec))
    if spec in LOSS_PRESETS:
        return NamedLoss(spec, LOSS_PRESETS[spec].module())
    if os.path.exists(spec):
        return NamedLoss(spec, load_loss(spec).module())
    raise ValueError(f"loss {spec!r} is neither a zoo loss ({', '.join(ZOO)}, optionally with "
                     f"parameters as in Focal:gamma=1), a preset ({', '.join(LOSS_PRESETS)}) nor an "
                     "existing loss file")


def logits_for_p_true(p_true: Tensor, num_classes: int) -> Tensor:
    """Logits whose softmax is p_true on class 0 and (1 - p_true)/(C - 1) on every other class."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    rest = ((1 - p_true) / (num_classes - 1)).unsqueeze(1).expand(-1, num_classes - 1)
    return torch.cat([p_true.unsqueeze(1), rest], dim=1).log()


def loss_against_p_true(loss: LossFn, p_true: Sequence[float] | Tensor,
                        num_classes: int) -> Tuple[Tensor, Tensor]:
    """(loss, d loss / d p_true) at each p_true in (0, 1), the true class being class 0.

    Computed in float64 where the loss supports it; the derivative is by autograd through the
    logits of `logits_for_p_true`.
    """
    p = torch.as_tensor(p_true, dtype=torch.float64).detach().clone()
    if p.dim() != 1 or not bool(((p > 0) & (p < 1)).all()):
        raise ValueError("p_true must be a 1-D sequence of probabilities strictly inside (0, 1)")
    p.requires_grad_(True)
    logits = logits_for_p_true(p, num_classes)
    values = loss(logits, torch.zeros(len(p), dtype=torch.long), reduction="none")
    (grad,) = torch.autograd.grad(values.sum(), p)
    return values.detach(), grad.detach()


def min_max_normalise(values: Tensor, grad: Tensor) -> Tuple[Tensor, Tensor]:
    """The curve rescaled to [0, 1] (as Fig. 5 draws ITL) and its gradient scaled alike."""
    low, high = values.min(), values.max()
    span = high - low
    if span <= 0:
        return torch.zeros_like(values), torch.zeros_like(grad)
    return (values - low) / span, grad / span
