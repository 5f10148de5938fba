"""Mixup that still mixes with one training domain: DomainBed's Mixup, pairing within the domain.

See docs/single_source_mixup.md.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Callable, List, Sequence, Tuple

import torch
from torch import Tensor

NAME = "SingleSourceMixup"
BASE = "Mixup"

Minibatch = Tuple[Tensor, Tensor]
PairsFn = Callable[[Sequence[Minibatch]], List[Tuple[Minibatch, Minibatch]]]

_swap_lock = threading.RLock()


def mixup_pairs(minibatches: Sequence[Minibatch],
                pairs_across_domains: PairsFn) -> List[Tuple[Minibatch, Minibatch]]:
    """The minibatch pairs to mix: a lone minibatch with a shuffle of itself, else across domains.

    One minibatch (x, y): [((x, y), (x[π], y[π]))] with π = torch.randperm(len(x)), Zhang et
    al.'s mixup. Several: `pairs_across_domains(minibatches)` (DomainBed's
    `random_pairs_of_minibatches`), untouched.
    """
    if len(minibatches) != 1:
        return pairs_across_domains(minibatches)
    x, y = minibatches[0]
    perm = torch.randperm(len(x), device=x.device)
    return [((x, y), (x[perm], y[perm]))]


def make_single_source_mixup(mixup: type) -> type:
    """A subclass of DomainBed's `Mixup` class `mixup` that mixes within a lone training domain."""
    module_name = mixup.update.__module__

    def update(self, minibatches, unlabeled=None):
        module = sys.modules[module_name]
        with _swap_lock:
            across = module.random_pairs_of_minibatches
            module.random_pairs_of_minibatches = functools.partial(
                mixup_pairs, pairs_across_domains=across)
            try:
                return mixup.update(self, minibatches, unlabeled)
            finally:
                module.random_pairs_of_minibatches = across

    doc = ("DomainBed's Mixup; with one training domain it mixes the minibatch with a shuffle of "
           "itself (Zhang et al. 2018) instead of with itself (domainbed-itl).")
    return type(NAME, (mixup,), {"update": update, "__doc__": doc, "__module__": __name__,
                                 "__qualname__": NAME})


# What DomainBed's algorithms of the paper's Table 4 do with a single training domain (the
# single-source sweep prints these; docs/single_source_mixup.md has the details and the tests).
ONE_DOMAIN_NOTES = {
    "Mixup": ("DomainBed's Mixup pairs the only source minibatch with itself, so with one "
              f"training domain it is ERM (plain cross-entropy); {NAME} mixes within the domain"),
    "CORAL": ("DomainBed's CORAL penalty sums over pairs of training domains, so with one training "
              "domain it is zero and CORAL is ERM (the same updates; only the seeds differ)"),
}
