"""Losses: the Taylor family (ITL), the robust-loss zoo, the registry of learnable loss families
and loss files.

Nothing here imports DomainBed.

See docs/losses.md.
"""

from . import builtin_families  # noqa: F401  (registers the built-in families before any look-up)
from .families import (PLUGINS_ENV, FixedLoss, LossFamily, OrderedFamily, Parameter,
                       ParameterRangeError, family_names, get_family, register_family)
from .lossfile import LOSS_PRESETS, LossFileError, LossSpec, load_loss, resolve_loss, save_loss
from .taylor import (ITL_PARAMETERS, TaylorLoss, cross_entropy_taylor_init, num_taylor_params,
                     taylor_loss, taylor_loss_reference, taylor_terms)
from .zoo import ZOO, bce, cross_entropy, focal, gce, label_smoothing, poly, poly1, sce

__all__ = [
    "ITL_PARAMETERS", "LOSS_PRESETS", "PLUGINS_ENV", "ZOO", "FixedLoss", "LossFamily", "LossFileError",
    "LossSpec", "OrderedFamily", "Parameter", "ParameterRangeError", "TaylorLoss", "bce",
    "cross_entropy", "cross_entropy_taylor_init", "family_names", "focal", "gce", "get_family",
    "label_smoothing", "load_loss", "num_taylor_params", "poly", "poly1", "register_family",
    "resolve_loss", "save_loss", "sce", "taylor_loss", "taylor_loss_reference", "taylor_terms",
]
