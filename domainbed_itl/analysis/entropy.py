"""Entropy of predictive distributions, split by correctness (Fig. 7, Appendix A.2).

See docs/analyses.md.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor


def _as_multiclass(logits: Tensor) -> Tensor:
    """(batch, C) logits; a single logit column is a binary problem, logits (0, z)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, classes), got {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


def prediction_entropy(logits: Tensor) -> Tensor:
    """H(softmax(z)) = -Σ_c p_c log p_c per sample, in nats (0 log 0 = 0)."""
    probs = _as_multiclass(logits).double().softmax(dim=1)
    return torch.special.entr(probs).sum(dim=1)


def entropy_by_correctness(logits: Tensor, target: Tensor) -> Dict[str, float]:
    """Mean entropy of the correctly and of the wrongly classified samples, their counts, accuracy.

    The prediction is the argmax class, as DomainBed's `accuracy`; a mean over no sample is NaN.
    """
    logits = _as_multiclass(logits)
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    h = prediction_entropy(logits)
    correct = logits.argmax(dim=1).eq(target)
    n_correct, n = int(correct.sum()), len(target)

    def mean(mask: Tensor) -> float:
        return float(h[mask].mean()) if bool(mask.any()) else math.nan

    return {"entropy_correct": mean(correct), "entropy_incorrect": mean(~correct),
            "entropy_all": mean(torch.ones_like(correct)), "n_correct": n_correct,
            "n_incorrect": n - n_correct, "accuracy": n_correct / n if n else math.nan}
