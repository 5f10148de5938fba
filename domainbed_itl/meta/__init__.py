"""The meta-learner: loss parameters ω learned by leave-one-domain-out implicit gradients.

Nothing here imports DomainBed: its datasets arrive as tensors through domainbed_itl.bridge.domainbed_data.
See docs/meta_learning.md#how-the-meta-learner-is-built.
"""

from .data import DomainData, check_domains, synthetic_dataset, synthetic_domains
from .hypergradient import flatten_module, implicit_grad
from ..files.runfolder import RunDirError
from .runner import run_meta_training
from .solvers import cg, dense, neumann
from .aggregators import mean, pcgrad
from .config import InnerSettings, MetaConfig, preset_config
from .settings import SettingsError
from .draws import step_generator
from .inner import mlp
from .trainer import MetaTrainer, NonFiniteError

__all__ = [
    "DomainData", "InnerSettings", "MetaConfig", "MetaTrainer", "NonFiniteError", "RunDirError",
    "SettingsError", "cg",
    "check_domains", "dense", "flatten_module", "implicit_grad", "mean", "mlp", "neumann",
    "pcgrad", "preset_config", "run_meta_training", "step_generator", "synthetic_dataset",
    "synthetic_domains",
]
