"""Hand-designed robust losses compared with ITL in Tables 1 and 3 of the paper.

Every loss takes (logits, target, ..., reduction="mean") with integer class targets, like
F.cross_entropy, so any of them can replace cross-entropy in a training loop.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .taylor import _check_target, _reduce


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


def focal(logits: Tensor, target: Tensor, gamma: float = 2.0, reduction: str = "mean") -> Tensor:
    """Focal loss -(1-ŷ_t)^γ log ŷ_t (Lin et al., ICCV 2017; Mukhoti et al., NeurIPS 2020).

    1-ŷ_t is floored at 1e-12 so that γ < 1 keeps a finite gradient when ŷ_t rounds to 1.
    """
    _check_target(logits, target)
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    return _reduce(-(1.0 - log_p.exp()).clamp_min(1e-12).pow(gamma) * log_p, reduction)


def sce(logits: Tensor, target: Tensor, alpha: float | Tensor = 0.1, beta: float | Tensor = 1.0,
        log_zero: float = -4.0, reduction: str = "mean") -> Tensor:
    """Symmetric CE α·CE + β·RCE, RCE = -Σ_c ŷ_c log y_c with log 0 := A = -4 (Wang et al., ICCV 2019).

    With one-hot y, RCE = -A (1 - ŷ_t). α and β may be tensors (iSCE learns them).
    """
    _check_target(logits, target)
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    rce = -log_zero * (1.0 - log_p.exp())
    return _reduce(alpha * -log_p + beta * rce, reduction)


def gce(logits: Tensor, target: Tensor, q: float = 0.7, reduction: str = "mean") -> Tensor:
    """Generalised CE (1 - ŷ_t^q)/q (Zhang & Sabuncu, NeurIPS 2018); q -> 0 gives CE."""
    _check_target(logits, target)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"GCE needs q in (0, 1], got {q!r}")
    log_p = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    return _reduce((1.0 - (q * log_p).exp()) / q, reduction)


def label_smoothing(logits: Tensor, target: Tensor, epsilon: float = 0.1,
                    reduction: str = "mean") -> Tensor:
    """CE against (1-ε)·onehot + ε/C (Szegedy et al., CVPR 2016; Pereyra et al., ICLR 2017)."""
    _check_target(logits, target)
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing needs epsilon in [0, 1), got {epsilon!r}")
    return _reduce(F.cross_entropy(logits, target.long(), reduction="none", label_smoothing=epsilon),
                   reduction)


ZOO = {
    "CE": cross_entropy,
    "BCE": bce,
    "Focal": focal,
    "SCE": sce,
    "GCE": gce,
    "LS": label_smoothing,
}
