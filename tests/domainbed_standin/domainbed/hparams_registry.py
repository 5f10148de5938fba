"""Test double for `domainbed.hparams_registry`, written for domainbed-itl's tests.

The bridge wraps `_hparams(algorithm, dataset, random_seed)`, which maps each hparam name to
(default, random draw), the draw seeded per name; `default_hparams` and `random_hparams` pick
one side. Three hparams only: lr, weight_decay and batch_size.
"""

import numpy as np

from domainbed.lib import misc

SEARCH_SPACE = {  # name: (default, draw from a numpy RandomState)
    "lr": (1e-3, lambda rng: 10 ** rng.uniform(-4.5, -2.5)),
    "weight_decay": (0.0, lambda rng: 10 ** rng.uniform(-6, -2)),
    "batch_size": (8, lambda rng: int(2 ** rng.uniform(3, 5))),
}


def _hparams(algorithm, dataset, random_seed):
    """{name: (default, random draw)}; the draw of each name has a seed of its own."""
    table = {}
    for name, (default, draw) in SEARCH_SPACE.items():
        table[name] = (default, draw(np.random.RandomState(misc.seed_hash(random_seed, name))))
    return table


def default_hparams(algorithm, dataset):
    """Every hparam at its default."""
    return {name: pair[0] for name, pair in _hparams(algorithm, dataset, 0).items()}


def random_hparams(algorithm, dataset, seed):
    """Every hparam drawn with `seed`."""
    return {name: pair[1] for name, pair in _hparams(algorithm, dataset, seed).items()}
