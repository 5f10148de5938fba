"""The built-in loss families, registered when domainbed_itl.losses is imported.

See docs/losses.md.
"""

from __future__ import annotations

import functools
from fractions import Fraction

from torch import Tensor

from . import zoo
from .families import LossFamily, OrderedFamily, Parameter, register_family
from .taylor import (MAX_ORDER, MIN_ORDER, TaylorLoss, cross_entropy_taylor_init, taylor_loss,
                     taylor_terms)

POLY_ORDERS = range(1, 11)


def _taylor_default(order: int, index: int, num_classes: int) -> float:
    return cross_entropy_taylor_init(order, num_classes)[index]


def _taylor(order: int) -> LossFamily:
    centres = [Parameter("omega0", functools.partial(_taylor_default, order, 0), doc="yhat centre"),
               Parameter("omega1", functools.partial(_taylor_default, order, 1), doc="y centre")]
    weights = [Parameter(f"omega{k + 2}", functools.partial(_taylor_default, order, k + 2),
                         doc=f"weight of (yhat-omega0)^{i} (y-omega1)^{j}")
               for k, (i, j) in enumerate(taylor_terms(order))]
    return LossFamily("taylor", tuple(centres + weights),
                      functools.partial(taylor_loss, order=order, reduction="none"), order,
                      fixed=functools.partial(TaylorLoss, order=order),
                      doc=f"Taylor polynomial of order {order} (Eq. 7-10)")


def _sce(logits: Tensor, target: Tensor, omega: Tensor) -> Tensor:
    return zoo.sce(logits, target, alpha=omega[0], beta=omega[1], reduction="none")


def _poly_loss(logits: Tensor, target: Tensor, omega: Tensor) -> Tensor:
    return zoo.poly(logits, target, omega, reduction="none")


def _poly(order: int) -> LossFamily:
    # ε_j >= -1/j keeps every coefficient 1/j + ε_j of (1-ŷ_t)^j >= 0, as Leng et al. require.
    return LossFamily("poly", tuple(
        Parameter(f"epsilon{j}", 0.0, f"[{Fraction(-1, j)}, inf)",
                  doc=f"shift of the coefficient of (1-p_t)^{j}") for j in range(1, order + 1)),
        _poly_loss, order, doc=f"PolyLoss Poly-{order} (Leng et al., ICLR 2022)")


def _focal(logits: Tensor, target: Tensor, omega: Tensor) -> Tensor:
    return zoo.focal(logits, target, gamma=omega[0], reduction="none")


def _label_smoothing(logits: Tensor, target: Tensor, omega: Tensor) -> Tensor:
    return zoo.label_smoothing(logits, target, epsilon=omega[0], reduction="none")


def _gce(logits: Tensor, target: Tensor, omega: Tensor) -> Tensor:
    return zoo.gce(logits, target, q=omega[0], reduction="none")


TAYLOR = OrderedFamily("taylor", range(MIN_ORDER, MAX_ORDER + 1), _taylor,
                       doc="Taylor polynomials of Eq. 7-10; order 4 is ITL's family")
SCE = LossFamily("sce", (Parameter("alpha", 0.1, doc="CE weight"), Parameter("beta", 1.0, doc="RCE weight")),
                 _sce, doc="symmetric cross-entropy (Wang et al., ICCV 2019): Table 1's iSCE")
POLY = OrderedFamily("poly", POLY_ORDERS, _poly, doc="PolyLoss Poly-N (Leng et al., ICLR 2022)")
FOCAL = LossFamily("focal", (Parameter("gamma", 2.0, "[0, inf)", "focusing parameter; 0 is CE"),),
                   _focal, doc="focal loss (Lin et al., ICCV 2017)")
LABEL_SMOOTHING = LossFamily(
    "label_smoothing", (Parameter("epsilon", 0.1, "[0, 1)", "smoothing; 0 is CE"),), _label_smoothing,
    doc="label smoothing (Szegedy et al., CVPR 2016)")
GCE = LossFamily("gce", (Parameter("q", 0.7, "(0, 1]", "q -> 0 is CE, 1 is MAE"),), _gce,
                 doc="generalised cross-entropy (Zhang & Sabuncu, NeurIPS 2018)")

for _family in (TAYLOR, SCE, POLY, FOCAL, LABEL_SMOOTHING, GCE):
    register_family(_family)
