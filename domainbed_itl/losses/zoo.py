"""Hand-designed robust losses compared with ITL in Tables 1 and 3 of the paper, and PolyLoss.

See docs/losses.md.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .taylor import _check_target, _reduce


def _check_number(name: str, value: Any, ok: Callable[[float], bool] = lambda v: True,
                  expected: str = "a finite number") -> None:
    """ValueError naming `name` unless the Python number `value` is finite and `ok` (a tensor is
    its family's to check)."""
    if isinstance(value, Tensor):
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy -log ŷ_t."""
    _check_target(logits, target)
    return _reduce(F.cross_entropy(logits, target.long(), reduction="none"), reduction)


def bce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """One-vs-all binary cross-entropy: Σ_c BCE(sigmoid(z_c), y_c) over the C binary problems."""
    _check_target(logits, target)
    onehot = F.one_hot(target.long(), logits.shape[1]).to(logits.dtype)
    per_class = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    return _reduce(per_class.sum(dim=1), reduction)


def focal(logits: Tensor, target: Tensor, gamma: float | Tensor = 2.0, reduction: str = "mean") -> Tensor:
    """Focal loss -(1-ŷ_t)^γ log ŷ_t (Lin et al., ICCV 2017; Mukhoti et al., NeurIPS 2020).

    1-ŷ_t is floored at 1e-12 so that γ < 1 keeps a finite gradient when ŷ_t rounds to 1.
    """
    _check_target(logits, target)
    _check_number("focal gamma", gamma, lambda g: g >= 0, "a finite number >= 0")
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    return _reduce(-(1.0 - log_p.exp()).clamp_min(1e-12).pow(gamma) * log_p, reduction)


def sce(logits: Tensor, target: Tensor, alpha: float | Tensor = 0.1, beta: float | Tensor = 1.0,
        log_zero: float = -4.0, reduction: str = "mean") -> Tensor:
    """Symmetric CE α·CE + β·RCE, RCE = -Σ_c ŷ_c log y_c with log 0 := A = -4 (Wang et al., ICCV 2019).

    With one-hot y, RCE = -A (1 - ŷ_t). α and β may be tensors (iSCE learns them).
    """
    _check_target(logits, target)
    for name, value in (("sce alpha", alpha), ("sce beta", beta), ("sce log_zero", log_zero)):
        _check_number(name, value)
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    rce = -log_zero * (1.0 - log_p.exp())
    return _reduce(alpha * -log_p + beta * rce, reduction)


def gce(logits: Tensor, target: Tensor, q: float | Tensor = 0.7, reduction: str = "mean") -> Tensor:
    """Generalised CE (1 - ŷ_t^q)/q (Zhang & Sabuncu, NeurIPS 2018); q -> 0 gives CE."""
    _check_target(logits, target)
    _check_number("GCE q", q, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    return _reduce((1.0 - (q * log_p).exp()) / q, reduction)


def label_smoothing(logits: Tensor, target: Tensor, epsilon: float | Tensor = 0.1,
                    reduction: str = "mean") -> Tensor:
    """CE against (1-ε)·onehot + ε/C (Szegedy et al., CVPR 2016; Pereyra et al., ICLR 2017):
    (1-ε)(-log ŷ_t) + ε·mean_c(-log ŷ_c)."""
    _check_target(logits, target)
    _check_number("label smoothing epsilon", epsilon, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    log_probs = F.log_softmax(logits, dim=1)
    log_p = log_probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return _reduce(-(1 - epsilon) * log_p - epsilon * log_probs.mean(dim=1), reduction)


def poly(logits: Tensor, target: Tensor, epsilons: Sequence[float] | Tensor,
         reduction: str = "mean") -> Tensor:
    """PolyLoss Poly-N, N = len(epsilons) (Leng et al., ICLR 2022):

    CE's expansion -log ŷ_t = Σ_j (1-ŷ_t)^j / j with its first N coefficients moved by ε_j.
    """
    _check_target(logits, target)
    if not isinstance(epsilons, Tensor):
        for j, value in enumerate(epsilons, start=1):  # Leng et al.: 1/j + ε_j >= 0
            _check_number(f"poly epsilon{j}", value, lambda v, j=j: v >= -1 / j, f"a number >= -1/{j}")
    eps = (epsilons.to(logits.dtype) if isinstance(epsilons, Tensor)
           else torch.tensor([float(e) for e in epsilons], dtype=logits.dtype, device=logits.device))
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    powers = torch.arange(1, eps.numel() + 1, dtype=logits.dtype, device=logits.device)
    # Eq. 3 of Leng et al.: L_Poly-N = -log ŷ_t + Σ_{j=1..N} ε_j (1 - ŷ_t)^j.
    return _reduce(-log_p + ((1 - log_p.exp()).unsqueeze(1) ** powers * eps).sum(dim=1), reduction)


def poly1(logits: Tensor, target: Tensor, epsilon: float = 2.0, reduction: str = "mean") -> Tensor:
    """Poly-1 (Leng et al., ICLR 2022, Eq. 4): -log ŷ_t + ε(1 - ŷ_t). ε = 2 is their ImageNet
    classification setting; ε = -1 removes the linear term, ε = 0 is cross-entropy."""
    return poly(logits, target, [epsilon], reduction)


ZOO = {
    "CE": cross_entropy,
    "BCE": bce,
    "Focal": focal,
    "SCE": sce,
    "GCE": gce,
    "LS": label_smoothing,
    "Poly1": poly1,
}
