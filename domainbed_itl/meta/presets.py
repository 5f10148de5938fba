"""Named meta-training settings: MetaConfig values that belong together.

`paper` is the protocol of Sec. 4.1 and Algorithms 1-2 read literally: SGD with η = 0.01 in the
outer and the inner loop, inner batch 32, a Neumann series of J = 15 terms returned without the
factor α (Algorithm 2 as printed: Σ_j (I − αH)^j v), PCGrad summed over the domains as in Yu et
al., 200 outer steps. With the same η, its outer step is (1/α)·n times that of the library's
defaults (a Neumann estimate of H⁻¹ and a mean over the n domains): 600 times with six domains.
The paper does not give every value; `GUESSES` names the ones chosen here and why.

`paper_guarded` is `paper` with one addition: a domain whose Neumann solve leaves a relative
residual above 1 (‖(I − αH)Σ − v‖ / ‖v‖, i.e. the series has stopped converging because the
learned loss's curvature grew past αλ_max = 2) gives no hypergradient that step, and a step with
no trusted domain makes no update. On the offline RotatedMNIST digits the literal `paper` run
diverged at outer step 54 (docs/loss_search.md); the guarded one did not.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from .trainer import MetaConfig

META_PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {
        "family": "taylor", "order": 4, "outer_steps": 200, "outer_optimizer": "sgd",
        "outer_lr": 0.01, "inner_steps": 1000, "inner_lr": 0.01, "inner_optimizer": "sgd",
        "warm_start": False, "batch_size": 32, "hidden": (256,), "solver": "neumann",
        "neumann_steps": 15, "neumann_alpha": 0.01, "neumann_form": "algorithm2",
        "aggregate": "pcgrad", "aggregate_reduction": "sum",
    },
}
META_PRESETS["paper_guarded"] = {**META_PRESETS["paper"], "max_solver_residual": 1.0}

# What the paper does not say, per preset: the value chosen and the reason.
GUESSES: Dict[str, Dict[str, str]] = {
    "paper": {
        "neumann_alpha": "0.01: Algorithm 2 takes an α but the paper gives none; the inner "
                         "learning rate (0.01) is Lorraine et al.'s choice",
        "inner_steps": "1000: the paper trains the inner networks to 'convergence' without "
                       "saying how long",
        "init": "the Taylor expansion of cross-entropy (the family's default): the paper does "
                "not give the initial ω",
        "hidden": "784-256-10: the paper's MLP is 1024-256-10 for 32x32 inputs; DomainBed's "
                  "RotatedMNIST images are 28x28",
        "hvp_batch": "256 source examples per Hessian-vector product: not given in the paper",
    },
}
GUESSES["paper_guarded"] = {
    **GUESSES["paper"],
    "max_solver_residual": "1.0: ours, not the paper's; a residual above ‖v‖ means the solve "
                           "is no better than returning zero",
}


def preset_config(name: Optional[str], overrides: Optional[Mapping[str, Any]] = None) -> MetaConfig:
    """MetaConfig from MetaConfig's defaults, then preset `name` (None: none), then `overrides`."""
    if name is not None and name not in META_PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(META_PRESETS)}")
    values = {**(META_PRESETS[name] if name else {}), **(overrides or {})}
    unknown = sorted(set(values) - set(MetaConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown meta-training setting(s) {', '.join(unknown)}")
    return MetaConfig(**values)
