"""The meta-learner: loss parameters ω learned by leave-one-domain-out implicit gradients.

Nothing here imports DomainBed except `domainbed_data` (imported only on demand).
"""

from .data import DomainData, check_domains, synthetic_domains
from .hypergradient import flatten_module, implicit_grad
from .runner import RunDirError, run_meta_training
from .solvers import cg, dense, neumann
from .aggregators import mean, pcgrad
from .trainer import MetaConfig, MetaTrainer, NonFiniteError, mlp, step_generator

__all__ = [
    "DomainData", "MetaConfig", "MetaTrainer", "NonFiniteError", "RunDirError", "cg",
    "check_domains", "dense", "flatten_module", "implicit_grad", "mean", "mlp", "neumann",
    "pcgrad", "run_meta_training", "step_generator", "synthetic_domains",
]
