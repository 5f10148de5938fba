"""Losses: the Taylor family (ITL), the robust-loss zoo, learnable families and loss files.

Nothing here imports DomainBed.
"""

from .families import FAMILIES, SCEFamily, TaylorFamily, get_family
from .lossfile import LOSS_PRESETS, LossFileError, LossSpec, load_loss, resolve_loss, save_loss
from .taylor import (ITL_PARAMETERS, TaylorLoss, cross_entropy_taylor_init, num_taylor_params,
                     taylor_loss, taylor_loss_reference, taylor_terms)
from .zoo import ZOO, bce, cross_entropy, focal, gce, label_smoothing, sce

__all__ = [
    "FAMILIES", "ITL_PARAMETERS", "LOSS_PRESETS", "ZOO", "LossFileError", "LossSpec", "SCEFamily",
    "TaylorFamily", "TaylorLoss", "bce", "cross_entropy", "cross_entropy_taylor_init", "focal",
    "gce", "get_family", "label_smoothing", "load_loss", "num_taylor_params", "resolve_loss",
    "save_loss", "sce", "taylor_loss", "taylor_loss_reference", "taylor_terms",
]
