"""Mixup that still mixes with one training domain: DomainBed's Mixup, pairing within the domain.

DomainBed's `Mixup` (inter-domain mixup: Xu et al. 2020, Yan et al. 2020) mixes the minibatch of
one training domain with the minibatch of another: `random_pairs_of_minibatches` pairs domain
i with domain i + 1 of a random order. With a single training domain it pairs the only
minibatch with itself, so x~ = λx + (1 - λ)x = x and the objective λ·CE(f(x), y) +
(1 - λ)·CE(f(x), y) is plain cross-entropy: single-source Mixup is ERM.

`SingleSourceMixup` pairs a lone minibatch with a random permutation of itself, the mixup of
Zhang et al. (ICLR 2018): x~ = λx + (1 - λ)x[π], objective λ·CE(f(x~), y) + (1 - λ)·CE(f(x~), y[π]),
λ ~ Beta(mixup_alpha, mixup_alpha). With two or more training domains it is DomainBed's Mixup
unchanged: the same pairs, the same random draws, the same updates. Its hparams are Mixup's.

The class is DomainBed's own `Mixup` with its pairing function swapped while its `update` runs
(as algorithms.py swaps `F`), so the mixing and the objective are DomainBed's code. The swap is
module-global for the duration of `update`, like the loss swap of algorithms.py.

This module does not import DomainBed: the registry hands it DomainBed's Mixup class.
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
