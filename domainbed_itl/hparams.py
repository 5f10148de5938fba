"""Hyperparameters of the loss-replaced algorithms, in DomainBed's hparam registry.

`wrap_hparams` wraps DomainBed's `_hparams(algorithm, dataset, random_seed)`: for our
algorithms it returns the base algorithm's hparams plus the loss's own, each defined with
DomainBed's `_hparam(name, default, random_fn)` pattern and seed hashing, so
`default_hparams`, `random_hparams` and the sweep's random search work unchanged. The loss
hparams are those of `algorithms.LOSSES`. Algorithms in `SAME_HPARAMS_AS` (SingleSourceMixup)
take another DomainBed algorithm's hparams unchanged.
"""

from __future__ import annotations

import json
from typing import Callable, Dict

import numpy as np

from .algorithms import ALGORITHMS, LOSSES
from .single_source_mixup import BASE as MIXUP, NAME as SINGLE_SOURCE_MIXUP

# Our algorithms that take another DomainBed algorithm's hparams unchanged.
SAME_HPARAMS_AS: Dict[str, str] = {SINGLE_SOURCE_MIXUP: MIXUP}

_WRAPPED = "_domainbed_itl_wrapped"


def parse_hparams_flag(text: str) -> dict:
    """The value of a sweep's `--hparams` flag: a JSON object; ValueError naming the problem."""
    try:
        hparams = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--hparams {text!r} is not JSON: {error}") from None
    if not isinstance(hparams, dict):
        raise ValueError(f"--hparams must be a JSON object such as '{{\"batch_size\": 32}}', "
                         f"got {text!r}")
    return hparams


def wrap_hparams(original: Callable) -> Callable:
    """DomainBed's `_hparams`, extended to our algorithms; wrapping twice is a no-op."""
    if getattr(original, _WRAPPED, False):
        return original

    def _hparams(algorithm: str, dataset: str, random_seed: int) -> dict:
        spec = ALGORITHMS.get(algorithm)
        if spec is None:
            return original(SAME_HPARAMS_AS.get(algorithm, algorithm), dataset, random_seed)
        from domainbed.lib import misc

        hparams = original(spec.base, dataset, random_seed)

        def _hparam(name, default_val, random_val_fn):
            assert name not in hparams
            random_state = np.random.RandomState(misc.seed_hash(random_seed, name))
            hparams[name] = (default_val, random_val_fn(random_state))

        for name, default_val, random_val_fn in LOSSES[spec.loss].hparams:
            _hparam(name, default_val, random_val_fn)
        return hparams

    _hparams.__doc__ = original.__doc__
    setattr(_hparams, _WRAPPED, True)
    _hparams.__wrapped__ = original
    return _hparams
