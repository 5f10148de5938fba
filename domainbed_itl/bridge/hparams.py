"""Hyperparameters of the loss-replaced algorithms, in DomainBed's hparam registry.

See docs/domainbed.md.
"""

from __future__ import annotations

import json
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from ..datasets import num_classes as dataset_classes
from .algorithms import LOSS_ALGORITHMS, LOSSES, LossHparamError, check_loss_hparams
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


def check_sweep_losses(algorithms: Sequence[str], datasets: Optional[Sequence[str]],
                       overrides: Mapping) -> None:
    """Raise ValueError, naming the hparam, its value and what is expected, if one of our
    `algorithms` would train with a loss that cannot train under the sweep's `overrides` (its
    --hparams; the other loss hparams at their defaults, as random search draws them in range).

    For the datasets of domainbed_itl.datasets the loss must also be finite and minimisable for
    their classes; other datasets get that check in the algorithm's constructor.
    """
    checked = set()
    for algorithm in algorithms:
        if algorithm not in LOSS_ALGORITHMS:
            continue
        for dataset in datasets or [None]:
            num_classes = dataset_classes(dataset)
            key = (LOSS_ALGORITHMS[algorithm].loss, num_classes)
            if key in checked:
                continue
            checked.add(key)
            try:
                check_loss_hparams(algorithm, overrides, num_classes)
            except LossHparamError as error:
                where = f" (dataset {dataset})" if num_classes is not None else ""
                raise ValueError(f"--hparams: {error}{where}") from None


def wrap_hparams(original: Callable) -> Callable:
    """DomainBed's `_hparams`, extended to our algorithms; wrapping twice is a no-op."""
    if getattr(original, _WRAPPED, False):
        return original

    def _hparams(algorithm: str, dataset: str, random_seed: int) -> dict:
        spec = LOSS_ALGORITHMS.get(algorithm)
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
