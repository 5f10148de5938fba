"""The built-in loss families, registered when domainbed_itl.losses is imported.

See docs/losses.md.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import torch.nn.functional as F
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


COMPOSITE_TAYLOR_ORDER = 4


def _composite(logits: Tensor, target: Tensor, omega: Tensor) -> Tensor:
    # w[(1−ε)(−(1−p_t)^γ log p_t) + ε·mean_c(−log p_c)] + α(1−p_t) + Taylor_ω(ŷ, y)   (Eq. 8-10)
    log_probs = F.log_softmax(logits, dim=1)
    log_p = log_probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    focal_ce = -(1.0 - log_p.exp()).clamp_min(1e-12).pow(omega[1]) * log_p  # as zoo.focal
    smoothed = (1 - omega[2]) * focal_ce - omega[2] * log_probs.mean(dim=1)
    taylor = taylor_loss(logits, target, omega[4:], order=COMPOSITE_TAYLOR_ORDER, reduction="none")
    return omega[0] * smoothed + omega[3] * (1.0 - log_p.exp()) + taylor


def _composite_taylor(index: int, num_classes: int) -> float:
    """The Taylor centres of CE's expansion (ω0 = 1, ω1 = 0) and zero weights: no Taylor term."""
    return cross_entropy_taylor_init(COMPOSITE_TAYLOR_ORDER, num_classes)[index] if index < 2 else 0.0


COMPOSITE = LossFamily("composite", (
    Parameter("ce_weight", 1.0, "[0, inf)",
              "weight of the (focal, smoothed) CE term; 0 leaves Poly-1 and Taylor"),
    Parameter("focal_gamma", 0.0, "[0, inf)", "focal exponent of the CE term; 0 is CE"),
    Parameter("smoothing_epsilon", 0.0, "[0, 1)", "label smoothing of the CE term; 0 is none"),
    Parameter("poly1_epsilon", 0.0, "[-1, inf)", "weight of (1 - p_t), Poly-1's epsilon"),
    *(Parameter(f"taylor_omega{k}", functools.partial(_composite_taylor, k),
                doc="Taylor centre" if k < 2 else "Taylor weight (0: no term)")
      for k in range(2 + len(taylor_terms(COMPOSITE_TAYLOR_ORDER))))),
    _composite, doc="CE, focal, label smoothing, Poly-1 and order-4 Taylor terms; default CE")


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

for _family in (TAYLOR, SCE, POLY, FOCAL, LABEL_SMOOTHING, GCE, COMPOSITE):
    register_family(_family)
