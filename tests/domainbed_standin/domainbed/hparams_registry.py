"""Stand-in of DomainBed's hparams registry: `_hparams` built with the `_hparam` pattern."""

import numpy as np

from domainbed.lib import misc


def _hparams(algorithm, dataset, random_seed):
    """{name: (default, random draw)} for every hparam of `algorithm` on `dataset`."""
    hparams = {}

    def _hparam(name, default_val, random_val_fn):
        assert name not in hparams
        random_state = np.random.RandomState(misc.seed_hash(random_seed, name))
        hparams[name] = (default_val, random_val_fn(random_state))

    _hparam("lr", 1e-3, lambda r: 10 ** r.uniform(-4.5, -2.5))
    _hparam("weight_decay", 0.0, lambda r: 10 ** r.uniform(-6, -2))
    _hparam("batch_size", 8, lambda r: int(2 ** r.uniform(3, 5)))
    return hparams


def default_hparams(algorithm, dataset):
    return {a: b for a, (b, c) in _hparams(algorithm, dataset, 0).items()}


def random_hparams(algorithm, dataset, seed):
    return {a: c for a, (b, c) in _hparams(algorithm, dataset, seed).items()}
