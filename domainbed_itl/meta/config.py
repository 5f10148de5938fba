"""The meta-training configuration: one tree of settings (`InnerSettings`, `OuterSettings`,
`SolverSettings`, `DiagnosticsSettings`, composed into `MetaConfig`), each setting declared once
with its default, rule and help; the named presets; the linear solver it configures.

The presets and the reasons behind the values the paper does not give: docs/meta_learning.md
and docs/loss_search.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..losses.families import get_family
from . import aggregators, objectives, solvers
from .inner import INNER_OPTIMIZERS, SCHEDULES, InnerOptimizer, StopRule, learning_rates
from .settings import Composed, Settings, SettingsError, part, setting
from .state import OUTER_OPTIMIZERS as OUTER_STATE_OPTIMIZERS

OUTER_OPTIMIZERS = tuple(OUTER_STATE_OPTIMIZERS)
NEUMANN_FORMS = ("inverse", "algorithm2")
SOLVERS = ("neumann", "cg", "minres")
POSITIVE_INT = dict(kind="int", low=1)
COUNT = dict(kind="int", low=0)
POSITIVE = dict(kind="float", low=0, low_open=True)
NONNEGATIVE = dict(kind="float", low=0)
BOOL = dict(kind="bool")


@dataclass(frozen=True)
class InnerSettings(Settings):
    """How one inner network is trained (Algorithm 1, lines 9-11); meta-training and the
    evaluation protocol (evaluate.py) share it. A setting added here is a flag of every command
    that trains inner networks, and part of their saved settings."""

    inner_steps: int = setting(1000, "inner training steps (with a stopping rule: the cap)",
                               **POSITIVE_INT)
    inner_optimizer: str = setting("sgd", "inner optimiser", kind="choice",
                                   choices=INNER_OPTIMIZERS, label="inner optimizer")
    inner_lr: float = setting(0.01, "inner learning rate", **POSITIVE)
    inner_momentum: float = setting(0.9, "with --inner_optimizer momentum", kind="float", low=0,
                                    high=1, high_open=True)
    batch_size: int = setting(32, "inner minibatch size", **POSITIVE_INT)
    hidden: Tuple[int, ...] = setting((256,), "hidden widths of the base MLP, e.g. 256 (two "
                                      "weight layers)", kind="widths")
    inner_schedule: str = setting("constant", "learning rate over the inner steps: constant, or "
                                  "annealed to 0 over them (cosine, linear)", kind="choice",
                                  choices=SCHEDULES)
    inner_weight_decay: float = setting(0.0, "λ of an L2 term λ/2‖θ‖² in the inner objective "
                                        "(also in the implicit gradient)", **NONNEGATIVE)
    inner_stop_ratio: Optional[float] = setting(
        None, "stop a network once its gradient norm on the source-evaluation examples is at "
        "most this fraction (0 to 1) of its start; --inner_steps is then the cap", kind="float",
        low=0, high=1, low_open=True, high_open=True, optional=True,
        expected="None (no stopping rule) or a number in (0, 1), the gradient-norm fraction to "
                 "stop at")
    inner_stop_every: int = setting(50, "check the stopping rule every this many inner steps",
                                    **POSITIVE_INT)

    def optimizer(self) -> InnerOptimizer:
        """The configured inner optimiser."""
        return InnerOptimizer(self.inner_optimizer, self.inner_lr, self.inner_momentum)

    def learning_rates(self) -> Optional[List[float]]:
        """The learning rate of every step (None: the optimiser's, constant)."""
        return learning_rates(self.inner_schedule, self.inner_lr, self.inner_steps)

    def stop_rule(self) -> Optional[StopRule]:
        """The stopping rule (None: train for inner_steps steps)."""
        return None if self.inner_stop_ratio is None else StopRule(self.inner_stop_ratio,
                                                                   self.inner_stop_every)

    @property
    def plain(self) -> bool:
        """Whether a training is the same whatever its length: a constant learning rate and no
        stopping rule (so one training can be read off at several lengths)."""
        return self.inner_schedule == "constant" and self.inner_stop_ratio is None


@dataclass(frozen=True)
class OuterSettings(Settings):
    """The outer loop (Algorithm 1): its length, optimiser, aggregation, warm start and M's batch."""

    outer_steps: int = setting(200, "outer steps", **POSITIVE_INT)
    outer_optimizer: str = setting("sgd", "sgd is Algorithm 1's plain gradient descent",
                                   kind="choice", choices=OUTER_OPTIMIZERS, label="outer optimizer")
    outer_lr: float = setting(0.01, "outer learning rate", **POSITIVE)
    aggregate: str = setting("pcgrad", "how the domains' hypergradients are combined",
                             kind="choice", choices=tuple(aggregators.AGGREGATORS),
                             label="aggregation")
    aggregate_reduction: str = setting("mean", "sum the per-domain hypergradients (Yu et al.'s "
                                       "PCGrad, the paper) or average them", kind="choice",
                                       choices=aggregators.REDUCTIONS)
    warm_start: bool = setting(False, "continue training the previous outer step's inner "
                               "networks instead of fresh ones (online IFT)", **BOOL)
    outer_batch: Optional[int] = setting(None, "held-out examples for M per domain (default: "
                                         "the whole domain)", optional=True, **POSITIVE_INT)
    objective: str = setting("heldout_ce", "the meta-objective M on each held-out domain, "
                             "minimised (docs/objectives.md): " + "; ".join(
                                 f"{o.name} rewards {o.rewards}" for o in objectives.BUILT_IN)
                             + "; or one registered in DOMAINBED_ITL_OBJECTIVES's modules",
                             kind="choice", registry=objectives.objective_names, label="objective")


@dataclass(frozen=True)
class SolverSettings(Settings):
    """The implicit gradient's linear solve (Algorithm 2) and which solves enter the update."""

    solver: str = setting("neumann", "the linear solver", kind="choice", choices=SOLVERS)
    neumann_steps: int = setting(15, "Neumann series terms", **POSITIVE_INT)
    neumann_alpha: float = setting(0.01, "the Neumann series' step α", **POSITIVE)
    neumann_form: str = setting("inverse", "inverse: α Σ (I-αH)^j v, an estimate of H^-1 v; "
                                "algorithm2: the sum without α, as Algorithm 2 is printed",
                                kind="choice", choices=NEUMANN_FORMS)
    neumann_power_iters: int = setting(0, "if > 0: α = neumann_alpha/λ̂_max per domain, λ̂_max "
                                       "from this many power iterations (needs --neumann_form "
                                       "inverse, --neumann_alpha < 2)", **COUNT)
    neumann_early_stop: bool = setting(False, "return the Neumann partial sum of smallest "
                                       "residual", **BOOL)
    solver_damping: float = setting(0.0, "solve (H + μI)u = -v with this μ (ridge damping)",
                                    **NONNEGATIVE)
    cg_maxiter: int = setting(15, "conjugate-gradient iterations", **POSITIVE_INT)
    cg_tol: float = setting(1e-6, "conjugate-gradient tolerance", **NONNEGATIVE)
    minres_maxiter: int = setting(300, "MINRES iterations (solver minres: for a Hessian that "
                                  "may be indefinite; one domain at a time, in float64)",
                                  **POSITIVE_INT)
    minres_tol: float = setting(1e-10, "MINRES relative tolerance", **NONNEGATIVE)
    hvp_batch: int = setting(256, "source examples in the Hessian-vector products", **POSITIVE_INT)
    hvp_all_sources: bool = setting(False, "Hessian-vector products on every source example (the "
                                    "inner training's own Hessian), not on an hvp_batch draw",
                                    **BOOL)
    max_solver_residual: Optional[float] = setting(
        None, "leave out of the update every domain whose linear solve has a larger relative "
        "residual (1: worse than no solve, as a diverging Neumann series); no update when none "
        "is left", optional=True, **POSITIVE)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_neumann_options()

    def _check_neumann_options(self) -> None:
        """The Neumann-only options need the Neumann solver, and α relative to 1/λ̂_max a
        scaled series with a step below 2/λ̂_max."""
        for name in ("neumann_power_iters", "neumann_early_stop"):
            if getattr(self, name) and self.solver != "neumann":
                raise SettingsError(name, f"{name} {getattr(self, name)!r} applies to the Neumann "
                                          f"solver only; expected solver 'neumann', got {self.solver!r}")
        if self.neumann_power_iters and self.neumann_form != "inverse":
            raise SettingsError("neumann_form", f"neumann_power_iters {self.neumann_power_iters} "
                                f"makes α differ per domain, which needs neumann_form 'inverse' (a "
                                f"series scaled by its α), got {self.neumann_form!r}")
        if self.neumann_power_iters and not self.neumann_alpha < 2:
            raise SettingsError("neumann_alpha", f"with neumann_power_iters, neumann_alpha is "
                                f"α·λ̂_max and must be below 2 for the series to converge, got "
                                f"{self.neumann_alpha!r}")

    def solve(self) -> solvers.Solver:
        """The configured linear solver as a `solve(matvec, b)` callable."""
        if self.solver == "neumann":
            solve = functools.partial(solvers.neumann, steps=self.neumann_steps,
                                      alpha=self.neumann_alpha, power_iters=self.neumann_power_iters,
                                      early_stop=self.neumann_early_stop)
        elif self.solver == "cg":
            solve = functools.partial(solvers.cg, maxiter=self.cg_maxiter, tol=self.cg_tol)
        else:
            solve = functools.partial(solvers.minres, maxiter=self.minres_maxiter, tol=self.minres_tol)
        if self.solver_damping:
            return functools.partial(solvers.damped, solve=solve, damping=self.solver_damping)
        return solve

    @property
    def batchable(self) -> bool:
        """Whether the solve runs under vmap (MINRES is scipy's, one system at a time)."""
        return self.solver != "minres"

    @property
    def hypergradient_scale(self) -> float:
        """The scale of every hypergradient in the outer update: 1/α with neumann_form
        "algorithm2" (Algorithm 2 as printed sums the series without α, so its hypergradients
        are 1/α times dM/dω), else 1 (dM/dω itself). Every solver returns A⁻¹b."""
        printed = self.solver == "neumann" and self.neumann_form == "algorithm2"
        return 1 / self.neumann_alpha if printed else 1.0


@dataclass(frozen=True)
class DiagnosticsSettings(Settings):
    """What each outer step records beyond its metrics (diagnostics.py)."""

    reference_every: int = setting(0, "every K outer steps, compare one domain's hypergradient "
                                   "with a long MINRES solve (0: never)", **COUNT)
    reference_maxiter: int = setting(200, "MINRES iterations of that reference solve",
                                     **POSITIVE_INT)
    spectrum_iters: int = setting(0, "record each domain's Hessian λ_max and λ_min from this "
                                  "many power iterations each (0: not recorded)", **COUNT)


@dataclass(frozen=True, init=False)
class MetaConfig(Composed):
    """Everything that determines a meta-training run's result (besides data, init and device):
    the loss family and the tree of settings. Built from flat names (MetaConfig(inner_steps=5)),
    part names or both; a part's setting reads by its flat name (config.inner_steps)."""

    family: str = "taylor"
    order: Optional[int] = 4
    inner: InnerSettings = part(InnerSettings)
    outer: OuterSettings = part(OuterSettings)
    hypergradient: SolverSettings = part(SolverSettings)
    diagnostics: DiagnosticsSettings = part(DiagnosticsSettings)
    eval_size: Optional[int] = setting(2048, "source examples for the logged inner source "
                                       "accuracy and gradient norm", optional=True, **POSITIVE_INT)
    batched: bool = setting(True, "train the per-domain inner networks as one stack (and vmap "
                            "their hypergradients)", **BOOL)
    seed: int = setting(0, "seed of the inner trainings' draws (and of CMA-ES's samples)", **COUNT)

    def __post_init__(self) -> None:
        super().__post_init__()
        get_family(self.family, self.order)

    def flat(self) -> Dict[str, Any]:
        """Every setting by its flat name, family and order first."""
        return {"family": self.family, "order": self.order, **{
            k: v for k, v in super().flat().items() if k not in ("family", "order")}}

    def solve(self) -> solvers.Solver:
        """The configured linear solver as a `solve(matvec, b)` callable."""
        return self.hypergradient.solve()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MetaConfig":
        """A MetaConfig from a saved dict, in either layout: flat (checkpoints before the tree)
        or nested by part; settings it lacks take their defaults."""
        return cls(**values)


META_PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": {
        "family": "taylor", "order": 4, "outer_steps": 200, "outer_optimizer": "sgd",
        "outer_lr": 0.01, "inner_steps": 1000, "inner_lr": 0.01, "inner_optimizer": "sgd",
        "warm_start": False, "batch_size": 32, "hidden": (256,), "solver": "neumann",
        "neumann_steps": 15, "neumann_alpha": 0.01, "neumann_form": "algorithm2",
        "aggregate": "pcgrad", "aggregate_reduction": "sum", "objective": "heldout_ce",
    },
}
META_PRESETS["paper_guarded"] = {**META_PRESETS["paper"], "max_solver_residual": 1.0}
META_PRESETS["stationary"] = {
    **META_PRESETS["paper_guarded"],
    "inner_steps": 4000, "inner_lr": 0.3, "inner_schedule": "cosine", "inner_weight_decay": 1e-3,
    "inner_stop_ratio": 0.1, "inner_stop_every": 200,
    "neumann_steps": 50, "neumann_alpha": 1.0, "neumann_form": "inverse", "neumann_power_iters": 20,
    "neumann_early_stop": True, "solver_damping": 1e-2,
    "aggregate_reduction": "mean", "outer_optimizer": "adam", "outer_lr": 0.05, "spectrum_iters": 20,
}

# The stationary preset with a solve that gets the hypergradient's sign right past the optimum
# for objectives that ignore the logits' scale (docs/results/objectives.md).
META_PRESETS["stationary_minres"] = {
    **{k: v for k, v in META_PRESETS["stationary"].items() if not k.startswith("neumann_")},
    "solver": "minres", "minres_maxiter": 300, "solver_damping": 1e-3, "hvp_all_sources": True,
}

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
GUESSES["stationary"] = {
    **{k: v for k, v in GUESSES["paper_guarded"].items() if k not in ("neumann_alpha", "inner_steps")},
    "inner_steps": "4000, a cap: long enough for the networks to reach the stopping rule on "
                   "RotatedMNIST (measured in docs/results/stationary.md)",
    "inner_lr": "0.3, annealed to 0 (cosine): the paper's constant 0.01 and smaller annealed "
                "rates leave the networks short of the stopping rule "
                "(docs/results/stationary.md)",
    "inner_schedule": "cosine: decays to 0 over the cap, so SGD's noise dies out near the end",
    "inner_weight_decay": "1e-3: a finite stationary point and a Hessian floor of 1e-3 (iMAML's "
                          "proximal term plays this part), small beside the loss's curvature",
    "inner_stop_ratio": "0.1: stop once the gradient norm on the step's 2048 source-evaluation "
                        "examples is a tenth of its value at the start",
    "inner_stop_every": "200: a check is one forward-backward pass on up to 2048 examples, "
                        "about eval_size/(32·200) (a quarter or less) of the training between "
                        "checks",
    "neumann_alpha": "1.0, i.e. α = 1/λ̂_max per domain: the series then converges on the "
                     "positive spectrum whatever the loss's curvature",
    "neumann_power_iters": "20 power iterations per domain for λ̂_max (from below; the series "
                           "still converges while λ̂_max is within a factor 2 of the truth)",
    "neumann_form": "inverse: α differs per domain, so the series must carry its own α",
    "neumann_steps": "50: with α = 1/λ̂_max each term shrinks the error by (1 − λ/λ̂_max); more "
                     "terms cost little beside thousands of inner steps",
    "neumann_early_stop": "true: return the partial sum of smallest residual",
    "solver_damping": "1e-2: solve (H + μI)u = −v, lifting the slightly negative curvature left "
                      "near a stationary point (λ_min measured in docs/results/stationary.md); a "
                      "bias of order μ/λ in each direction",
    "aggregate_reduction": "mean: the library's default; with α = 1/λ̂_max the hypergradient "
                           "estimates dM/dω itself, not Algorithm 2's 1/α multiple",
    "outer_optimizer": "adam: a hypergradient at the true scale (not Algorithm 2's 1/α multiple) "
                       "needs another step size; Adam's does not depend on the scale",
    "outer_lr": "0.05: with Adam, ω moves by about 0.05 per coordinate and step at most",
    "spectrum_iters": "20: record λ_max and λ_min of each domain's Hessian (40 more products)",
}

GUESSES["stationary_minres"] = {
    **{k: v for k, v in GUESSES["stationary"].items() if not k.startswith("neumann_")},
    "solver": "minres: the Hessian of a network stopped at a tenth of its gradient norm is "
              "indefinite, where CG diverges and a Neumann series of hundreds of terms still "
              "leaves residuals of 0.3 (docs/results/objectives.md)",
    "minres_maxiter": "300: enough for the hypergradient's sign and about its size against "
                      "finite differences on RotatedMNIST (docs/results/objectives.md)",
    "solver_damping": "1e-3, the weight decay's size: 1e-2 turns the sign of calibrated_ce's and "
                      "soft_error's hypergradients at large ε (docs/results/objectives.md)",
    "hvp_all_sources": "true: on 256 drawn examples the Hessian misses directions the training "
                       "set curves, and the sign goes wrong (docs/results/objectives.md)",
}


def preset_config(name: Optional[str], overrides: Optional[Mapping[str, Any]] = None) -> MetaConfig:
    """MetaConfig from MetaConfig's defaults, then preset `name` (None: none), then `overrides`."""
    if name is not None and name not in META_PRESETS:
        raise SettingsError("preset", f"unknown preset {name!r}; expected one of "
                                      f"{', '.join(META_PRESETS)}")
    values = {**(META_PRESETS[name] if name else {}), **(overrides or {})}
    unknown = sorted(set(values) - set(MetaConfig().flat()))
    if unknown:
        raise SettingsError(unknown[0], f"unknown meta-training setting(s) {', '.join(unknown)}")
    return MetaConfig(**values)
