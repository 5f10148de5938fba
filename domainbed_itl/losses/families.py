"""Parametric loss families whose parameters ω can be meta-learned (Sec. 3.4, Table 1's iSCE).

A family maps (logits, integer targets, ω) to the minimised scalar loss, differentiably in both
logits and ω and with plain torch ops, so torch.func can take mixed second derivatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import zoo
from .taylor import (MAX_ORDER, MIN_ORDER, TaylorLoss, check_taylor_params,
                     cross_entropy_taylor_init, num_taylor_params, taylor_loss, taylor_terms)

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class TaylorFamily:
    """Taylor polynomials of order 2..5 (Eq. 7-10); order 4 is ITL's 12-parameter family."""

    order: int = 4
    name: str = "taylor"

    def __post_init__(self) -> None:
        taylor_terms(self.order)

    @property
    def num_params(self) -> int:
        """How many parameters ω has."""
        return num_taylor_params(self.order)

    def param_names(self) -> List[str]:
        """A readable name for each entry of ω, in order."""
        names = ["omega0 (yhat centre)", "omega1 (y centre)"]
        return names + [f"(yhat-omega0)^{i}(y-omega1)^{j}" for i, j in taylor_terms(self.order)]

    def check(self, parameters: Sequence[float] | Tensor) -> None:
        """Raise ValueError unless `parameters` has num_params entries."""
        check_taylor_params(parameters, self.order)

    def default_parameters(self, num_classes: int) -> List[float]:
        """The Taylor expansion of cross-entropy (see `cross_entropy_taylor_init`)."""
        return cross_entropy_taylor_init(self.order, num_classes)

    def loss(self, logits: Tensor, target: Tensor, omega: Tensor, reduction: str = "mean") -> Tensor:
        """The minimised loss, differentiable in `logits` and `omega`."""
        return taylor_loss(logits, target, omega, self.order, reduction)

    def module(self, parameters: Sequence[float]) -> torch.nn.Module:
        """The fixed loss with these parameters, for training (fast fused gradient)."""
        return TaylorLoss(parameters, self.order)


@dataclass(frozen=True)
class SCEFamily:
    """Symmetric cross-entropy with learnable (α, β): iSCE of Table 1."""

    name: str = "sce"
    order: Optional[int] = None

    @property
    def num_params(self) -> int:
        """How many parameters ω has."""
        return 2

    def param_names(self) -> List[str]:
        """A readable name for each entry of ω, in order."""
        return ["alpha (CE weight)", "beta (RCE weight)"]

    def check(self, parameters: Sequence[float] | Tensor) -> None:
        """Raise ValueError unless `parameters` has num_params entries."""
        n = parameters.numel() if isinstance(parameters, Tensor) else len(parameters)
        if n != 2:
            raise ValueError(f"an SCE loss has 2 parameters (alpha, beta), got {n}")

    def default_parameters(self, num_classes: int) -> List[float]:
        """Wang et al.'s CIFAR-10 setting α = 0.1, β = 1.0."""
        return [0.1, 1.0]

    def loss(self, logits: Tensor, target: Tensor, omega: Tensor, reduction: str = "mean") -> Tensor:
        """The minimised loss, differentiable in `logits` and `omega`."""
        return zoo.sce(logits, target, alpha=omega[0], beta=omega[1], reduction=reduction)

    def module(self, parameters: Sequence[float]) -> torch.nn.Module:
        """The fixed loss with these parameters, for training."""
        return _FixedSCE(float(parameters[0]), float(parameters[1]))


class _FixedSCE(torch.nn.Module):
    def __init__(self, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return zoo.sce(logits, target, self.alpha, self.beta, reduction=reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


FAMILIES = ("taylor", "sce")


def get_family(name: str, order: Optional[int] = None) -> "TaylorFamily | SCEFamily":
    """The family `name` ('taylor' with `order` in 2..5, or 'sce' with no order)."""
    if name == "taylor":
        if order is None:
            raise ValueError(f"the taylor family needs an order in [{MIN_ORDER}, {MAX_ORDER}]")
        return TaylorFamily(order)
    if name == "sce":
        if order is not None:
            raise ValueError(f"the sce family takes no order, got order={order!r}")
        return SCEFamily()
    raise ValueError(f"unknown loss family {name!r}; expected one of {', '.join(FAMILIES)}")
