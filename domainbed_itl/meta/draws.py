"""The random draws of one outer step, in one place (`draw_step`), from one CPU generator:
seeded by (seed, step) for meta-training and CMA-ES, by its own stream for the evaluation.
See docs/meta_learning.md#how-the-meta-learner-is-built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

_EVAL_STREAM = 0x45564C  # keeps evaluation draws apart from meta-training's (seed, step) draws


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that drives all the randomness of outer step `step` of run `seed`."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def evaluation_generator(seed: int) -> torch.Generator:
    """The CPU generator of evaluation unit `seed` (a stream of its own)."""
    return step_generator(_EVAL_STREAM, seed)


def domain_indices(sizes: Sequence[int]) -> Tuple[List[Tensor], List[Tensor]]:
    """(indices of each domain, indices of every domain but it) into the concatenated domains."""
    bounds = np.cumsum([0, *sizes]).tolist()
    domains = [torch.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    sources = [torch.cat(domains[:i] + domains[i + 1:]) for i in range(len(domains))]
    return domains, sources


@dataclass
class StepDraws:
    """One step's draws, for n leave-one-domain-out splits (indices into the concatenated data).

    init_seeds: one initial-weight seed per inner network; batches (n, steps, batch): the
    minibatches; hvp (n, hvp_batch) or None: the Hessian-vector-product examples; heldout and
    source_eval: per split, the held-out examples behind M and the source examples behind the
    logged source accuracy and stationarity; surgery: the generator of the step's aggregation.
    """

    init_seeds: List[int]
    batches: Tensor
    hvp: Optional[Tensor]
    heldout: List[Tensor]
    source_eval: List[Tensor]
    surgery: torch.Generator


def _subset(g: torch.Generator, index: Tensor, size: Optional[int]) -> Tensor:
    if size is None or size >= len(index):
        return index
    return index[torch.randperm(len(index), generator=g)[:size]]


def every_source(sources: Sequence[Tensor]) -> Tensor:
    """(n, m): each held-out domain's source examples for the Hessian-vector products, all of
    them; where the source sets differ in size, m = the smallest, evenly spaced over each set."""
    m = min(len(s) for s in sources)
    return torch.stack([s[torch.linspace(0, len(s) - 1, m).round().long()] for s in sources])


def draw_step(g: torch.Generator, domains: Sequence[Tensor], sources: Sequence[Tensor],
              steps: int, batch_size: int, hvp_batch: Optional[int] = None,
              heldout_size: Optional[int] = None, eval_size: Optional[int] = None,
              device: Optional[torch.device] = None) -> StepDraws:
    """All random choices of one step, drawn from `g` on the CPU in a fixed order, then moved to
    `device`. Sizes of None take whole domains (and draw nothing)."""

    def pick(index: Tensor, shape: Tuple[int, ...]) -> Tensor:
        return index[torch.randint(len(index), shape, generator=g)]

    n = len(domains)
    init_seeds = torch.randint(2 ** 62, (n,), generator=g).tolist()
    batches = torch.stack([pick(s, (steps, batch_size)) for s in sources])
    hvp = None if hvp_batch is None else torch.stack([pick(s, (hvp_batch,)) for s in sources])
    heldout = [_subset(g, d, heldout_size) for d in domains]
    source_eval = [_subset(g, s, eval_size) for s in sources]
    surgery = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (), generator=g)))
    return StepDraws(init_seeds, batches.to(device), None if hvp is None else hvp.to(device),
                     [h.to(device) for h in heldout], [s.to(device) for s in source_eval], surgery)
