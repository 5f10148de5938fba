"""Accuracy and cross-entropy of a model's predictions on a split (Table 7).

See docs/analyses.md.
"""

from __future__ import annotations

from typing import Dict

import torch.nn.functional as F
from torch import Tensor


def accuracy_and_cross_entropy(logits: Tensor, target: Tensor) -> Dict[str, float]:
    """{accuracy, cross_entropy, n}: argmax accuracy and mean cross-entropy -log softmax(z)_y.

    Cross-entropy measures every model alike, whatever loss it was trained with (Table 7: "loss
    measured by CrossEntropy").
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (batch, classes) and target (batch,), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if len(target) == 0:
        raise ValueError("no samples: accuracy and cross-entropy need at least one")
    logits = logits.double()
    return {"accuracy": float(logits.argmax(dim=1).eq(target).double().mean()),
            "cross_entropy": float(F.cross_entropy(logits, target.long())),
            "n": int(len(target))}
