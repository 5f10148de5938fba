"""Symmetric label noise on the source domains' training labels (`--label_noise RATE`), with
held-out domains judged on their clean labels.

See docs/objectives.md#label-noise-on-source-domains.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from .data import DomainData


def _check_rate(rate: float) -> None:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
        raise ValueError(f"label noise rate must be a number in [0, 1], got {rate!r}")


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int,
                          generator: torch.Generator) -> Tensor:
    """A copy of `labels` (int64, (n,)) in which exactly floor(rate·n + 1/2) labels, chosen
    uniformly without replacement, are replaced by a class drawn uniformly among the other
    num_classes − 1: the fraction of changed labels is that count over n, never a random one.
    Deterministic in the generator's state (a CPU generator)."""
    _check_rate(rate)
    if num_classes < 2:
        raise ValueError(f"label noise needs num_classes >= 2, got {num_classes!r}")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape (n,), got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]")
    count = math.floor(rate * labels.numel() + 0.5)
    chosen = torch.randperm(labels.numel(), generator=generator)[:count].to(labels.device)
    shift = torch.randint(1, num_classes, (count,), generator=generator).to(labels.device)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes  # uniform over the other classes
    return noisy


def domain_generator(seed: int, domain: int) -> torch.Generator:
    """The generator of domain `domain`'s noise: seeded with seed·1000 + domain, so a domain's
    noisy labels do not depend on which other domains get noise."""
    return torch.Generator().manual_seed(seed * 1000 + domain)


def with_label_noise(data: DomainData, rate: float, seed: int = 0,
                     domains: Optional[Sequence[int]] = None) -> DomainData:
    """`data` with `symmetric_label_noise` on the training labels of `domains` (default: every
    domain, since leave-one-domain-out trains on each of them as a source) and every domain's
    held-out labels set to the labels `data` judges it by (`heldout_targets`: the clean ones, or
    those the data set already had): a held-out domain is judged on clean labels by construction.
    A new DomainData; `data` is not changed. `info` records the rate, seed and domains."""
    _check_rate(rate)
    chosen = list(range(len(data.domains))) if domains is None else list(domains)
    bad = [k for k in chosen if isinstance(k, bool) or not isinstance(k, int)
           or not 0 <= k < len(data.domains)]
    if bad or len(set(chosen)) != len(chosen):
        raise ValueError(f"label noise domains must be distinct indices in [0, {len(data.domains)}), "
                         f"got {list(domains)}")
    noisy = [(x, symmetric_label_noise(y, rate, data.num_classes, domain_generator(seed, k))
              if k in chosen else y) for k, (x, y) in enumerate(data.domains)]
    info = {**data.info, "training_label_noise": rate, "training_label_noise_seed": seed,
            "training_label_noise_domains": chosen}
    return replace(data, domains=noisy, info=info, heldout_labels=data.heldout_targets())
