"""Hyperparameters of the loss-replaced algorithms, in DomainBed's hparam registry.

`wrap_hparams` wraps DomainBed's `_hparams(algorithm, dataset, random_seed)`: for our
algorithms it returns the base algorithm's hparams plus the loss's own, each defined with
DomainBed's `_hparam(name, default, random_fn)` pattern and seed hashing, so
`default_hparams`, `random_hparams` and the sweep's random search work unchanged. Random
search for a loss parameter draws around its published value.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from .algorithms import ALGORITHM_SPECS
from .single_source_mixup import BASE as MIXUP, NAME as SINGLE_SOURCE_MIXUP

# Our algorithms that take another DomainBed algorithm's hparams unchanged.
SAME_HPARAMS_AS: Dict[str, str] = {SINGLE_SOURCE_MIXUP: MIXUP}

HparamDef = Tuple[str, object, Callable[[np.random.RandomState], object]]

LOSS_HPARAMS: Dict[str, List[HparamDef]] = {
    # A preset name or the path of a loss file; random search keeps the learned loss fixed.
    "ITL": [("itl_loss", "ITL", lambda r: "ITL")],
    "BCE": [],
    # Lin et al. (2017) try γ in [0, 5] and recommend 2.
    "Focal": [("focal_gamma", 2.0, lambda r: float(r.choice([0.5, 1.0, 2.0, 3.0, 5.0])))],
    # Wang et al. (2019): α = 0.1, β = 1.0 on CIFAR-10; α in [0.01, 1], β in [0.1, ~3].
    "SCE": [("sce_alpha", 0.1, lambda r: float(10 ** r.uniform(-2, 0))),
            ("sce_beta", 1.0, lambda r: float(10 ** r.uniform(-1, 0.5)))],
    # Zhang & Sabuncu (2018): q = 0.7.
    "GCE": [("gce_q", 0.7, lambda r: float(r.uniform(0.4, 0.9)))],
    # Szegedy et al. (2016): ε = 0.1.
    "LS": [("ls_epsilon", 0.1, lambda r: float(r.uniform(0.0, 0.3)))],
}

_WRAPPED = "_domainbed_itl_wrapped"


def wrap_hparams(original: Callable) -> Callable:
    """DomainBed's `_hparams`, extended to our algorithms; wrapping twice is a no-op."""
    if getattr(original, _WRAPPED, False):
        return original

    def _hparams(algorithm: str, dataset: str, random_seed: int) -> dict:
        spec = ALGORITHM_SPECS.get(algorithm)
        if spec is None:
            return original(SAME_HPARAMS_AS.get(algorithm, algorithm), dataset, random_seed)
        from domainbed.lib import misc

        hparams = original(spec.base, dataset, random_seed)

        def _hparam(name, default_val, random_val_fn):
            assert name not in hparams
            random_state = np.random.RandomState(misc.seed_hash(random_seed, name))
            hparams[name] = (default_val, random_val_fn(random_state))

        for name, default_val, random_val_fn in LOSS_HPARAMS[spec.loss]:
            _hparam(name, default_val, random_val_fn)
        return hparams

    _hparams.__doc__ = original.__doc__
    setattr(_hparams, _WRAPPED, True)
    setattr(_hparams, "__wrapped__", original)
    return _hparams
