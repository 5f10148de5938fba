"""The meta-training configuration: `MetaConfig`, its validation, the named presets and the
documented guesses, and the linear solver it configures.

`MetaConfig` holds everything that determines a run's result besides data, initial loss and
device. Its defaults are the library's: a Neumann series that estimates H⁻¹ (`neumann_form`
"inverse") and a mean over domains. `META_PRESETS` holds named settings:

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
diverged at outer step 54 (docs/results/loss_search.md); the guarded one did not.

`stationary` is ours, not the paper's: it trains every inner network to a stationary point,
as the implicit function theorem assumes, and solves the linear system in a way that cannot
diverge (GUESSES["stationary"] gives every value and why). The inner step count becomes a cap:
a network stops at the first check (every `inner_stop_every` steps) where its gradient norm on
the step's fixed source-evaluation subset has fallen to `inner_stop_ratio` of its value at the
start; the learning rate anneals to 0 over the cap (cosine); an L2 term λ/2‖θ‖² gives the
stationary point a finite location and the Hessian a floor λ (iMAML's proximal term plays the
same part), and the implicit gradient differentiates that same objective. The Neumann step is
α = 1/λ̂_max per domain from power iterations, the system is damped ((H + μI)u = −v) and the
series returns its iterate of smallest residual.

`InnerSettings` is the part of the configuration that says how one inner network is trained
(base MLP, optimiser, minibatch, schedule, weight decay, stopping rule); the evaluation protocol
(evaluate.py) shares it. With its new fields at their defaults (constant learning rate, no
weight decay, no stopping rule) the inner training is the one of before, bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..losses.families import get_family
from . import aggregators, solvers
from .inner import INNER_OPTIMIZERS, SCHEDULES, InnerOptimizer, StopRule, learning_rates

OUTER_OPTIMIZERS = ("sgd", "adam")
NEUMANN_FORMS = ("inverse", "algorithm2")
SOLVERS = ("neumann", "cg")
_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_positive_int(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is an integer >= 1 (a bool is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_nonnegative_int(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is an integer >= 0 (a bool is not one)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_positive_float(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is a number in (0, float32's maximum]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
            0 < value <= _FLOAT32_MAX):
        raise ValueError(f"{name} must be a positive number no larger than float32's maximum "
                         f"{_FLOAT32_MAX:.4g}, got {value!r}")


def check_nonnegative_float(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is a number in [0, float32's maximum]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
            0 <= value <= _FLOAT32_MAX):
        raise ValueError(f"{name} must be a number >= 0 no larger than float32's maximum "
                         f"{_FLOAT32_MAX:.4g}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """ValueError naming `name`, the value and the choices unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def check_bool(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class InnerSettings:
    """How one inner network is trained (Algorithm 1, lines 9-11): the base MLP's hidden widths,
    the optimiser with its learning rate and momentum, the minibatch size and the step count.

    inner_schedule: the learning rate over the steps ("constant", or annealed to 0 over
    inner_steps: "cosine", "linear"); inner_weight_decay: λ of an L2 term λ/2‖θ‖² in the inner
    objective; inner_stop_ratio: None, or stop a network at the first check (every
    inner_stop_every steps) where its gradient norm on a fixed batch is at most this fraction of
    its value at the start, inner_steps being then the cap.
    """

    inner_steps: int = 1000
    inner_lr: float = 0.01
    inner_optimizer: str = "sgd"
    inner_momentum: float = 0.9
    batch_size: int = 32
    hidden: Tuple[int, ...] = (256,)
    inner_schedule: str = "constant"
    inner_weight_decay: float = 0.0
    inner_stop_ratio: Optional[float] = None
    inner_stop_every: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        check_positive_int("inner_steps", self.inner_steps)
        check_positive_int("batch_size", self.batch_size)
        check_positive_float("inner_lr", self.inner_lr)
        check_choice("inner optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        if (not isinstance(self.inner_momentum, (int, float)) or isinstance(self.inner_momentum, bool)
                or not 0 <= self.inner_momentum < 1):
            raise ValueError(f"inner_momentum must be a number in [0, 1), got {self.inner_momentum!r}")
        if not self.hidden:
            raise ValueError("hidden must list at least one width (two weight layers), got ()")
        for width in self.hidden:
            check_positive_int("every hidden width", width)
        check_choice("inner_schedule", self.inner_schedule, SCHEDULES)
        check_nonnegative_float("inner_weight_decay", self.inner_weight_decay)
        check_positive_int("inner_stop_every", self.inner_stop_every)
        ratio = self.inner_stop_ratio
        if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool)
                                  or not 0 < ratio < 1):
            raise ValueError(f"inner_stop_ratio must be None (no stopping rule) or a number in "
                             f"(0, 1), the gradient-norm fraction to stop at, got {ratio!r}")

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

    @classmethod
    def of(cls, settings: Any, **changes: Any) -> "InnerSettings":
        """The InnerSettings fields of `settings` (e.g. a MetaConfig), with `changes`."""
        return cls(**{**{k: getattr(settings, k) for k in cls.__dataclass_fields__}, **changes})


@dataclass(frozen=True)
class MetaConfig:
    """Everything that determines a meta-training run's result (besides data, init and device).

    See the module docstring for the defaults and `META_PRESETS` for named settings.
    """

    family: str = "taylor"
    order: Optional[int] = 4
    outer_steps: int = 200
    inner_steps: int = 1000
    inner_lr: float = 0.01
    inner_optimizer: str = "sgd"
    inner_momentum: float = 0.9
    warm_start: bool = False
    batch_size: int = 32
    hidden: Tuple[int, ...] = (256,)
    inner_schedule: str = "constant"
    inner_weight_decay: float = 0.0
    inner_stop_ratio: Optional[float] = None
    inner_stop_every: int = 50
    solver: str = "neumann"
    neumann_steps: int = 15
    neumann_alpha: float = 0.01
    neumann_form: str = "inverse"
    neumann_power_iters: int = 0
    neumann_early_stop: bool = False
    solver_damping: float = 0.0
    cg_maxiter: int = 15
    cg_tol: float = 1e-6
    hvp_batch: int = 256
    outer_batch: Optional[int] = None
    eval_size: Optional[int] = 2048
    aggregate: str = "pcgrad"
    aggregate_reduction: str = "mean"
    outer_optimizer: str = "sgd"
    outer_lr: float = 0.01
    batched: bool = True
    max_solver_residual: Optional[float] = None
    reference_every: int = 0
    reference_maxiter: int = 200
    spectrum_iters: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        get_family(self.family, self.order)
        _ = self.inner  # validates the inner-training settings
        for name in ("outer_steps", "neumann_steps", "cg_maxiter", "hvp_batch", "reference_maxiter"):
            check_positive_int(name, getattr(self, name))
        for name in ("outer_batch", "eval_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in ("neumann_alpha", "outer_lr"):
            check_positive_float(name, getattr(self, name))
        if self.max_solver_residual is not None:
            check_positive_float("max_solver_residual", self.max_solver_residual)
        if not isinstance(self.cg_tol, (int, float)) or not self.cg_tol >= 0:
            raise ValueError(f"cg_tol must be a number >= 0, got {self.cg_tol!r}")
        check_choice("solver", self.solver, SOLVERS)
        check_choice("neumann_form", self.neumann_form, NEUMANN_FORMS)
        check_choice("aggregation", self.aggregate, tuple(aggregators.AGGREGATORS))
        check_choice("aggregate_reduction", self.aggregate_reduction, aggregators.REDUCTIONS)
        check_choice("outer optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        for name in ("warm_start", "batched", "neumann_early_stop"):
            check_bool(name, getattr(self, name))
        for name in ("seed", "reference_every", "neumann_power_iters", "spectrum_iters"):
            check_nonnegative_int(name, getattr(self, name))
        check_nonnegative_float("solver_damping", self.solver_damping)
        self._check_neumann_options()

    def _check_neumann_options(self) -> None:
        """The Neumann-only options need the Neumann solver, and α relative to 1/λ̂_max a
        scaled series with a step below 2/λ̂_max."""
        for name in ("neumann_power_iters", "neumann_early_stop"):
            if getattr(self, name) and self.solver != "neumann":
                raise ValueError(f"{name} {getattr(self, name)!r} applies to the Neumann solver "
                                 f"only; expected solver 'neumann', got {self.solver!r}")
        if self.neumann_power_iters and self.neumann_form != "inverse":
            raise ValueError(f"neumann_power_iters {self.neumann_power_iters} makes α differ per "
                             f"domain, which needs neumann_form 'inverse' (a series scaled by its "
                             f"α), got {self.neumann_form!r}")
        if self.neumann_power_iters and not self.neumann_alpha < 2:
            raise ValueError(f"with neumann_power_iters, neumann_alpha is α·λ̂_max and must be "
                             f"below 2 for the series to converge, got {self.neumann_alpha!r}")

    @property
    def inner(self) -> InnerSettings:
        """The inner-training settings (validated)."""
        return InnerSettings.of(self)

    def solve(self) -> solvers.Solver:
        """The configured linear solver as a `solve(matvec, b)` callable."""
        if self.solver == "neumann":
            solve = functools.partial(solvers.neumann, steps=self.neumann_steps,
                                      alpha=self.neumann_alpha, scale=self.neumann_form == "inverse",
                                      power_iters=self.neumann_power_iters,
                                      early_stop=self.neumann_early_stop)
        else:
            solve = functools.partial(solvers.cg, maxiter=self.cg_maxiter, tol=self.cg_tol)
        if self.solver_damping:
            return functools.partial(solvers.damped, solve=solve, damping=self.solver_damping)
        return solve

    @property
    def solution_scale(self) -> float:
        """c such that c·solve(H, b) estimates H⁻¹ b: α for Algorithm 2 as printed, else 1."""
        return self.neumann_alpha if self.solver == "neumann" and self.neumann_form == "algorithm2" else 1.0

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as a plain dict (stored in checkpoints and provenance)."""
        return asdict(self)


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
META_PRESETS["stationary"] = {
    **META_PRESETS["paper_guarded"],
    "inner_steps": 4000, "inner_lr": 0.3, "inner_schedule": "cosine", "inner_weight_decay": 1e-3,
    "inner_stop_ratio": 0.1, "inner_stop_every": 200,
    "neumann_steps": 50, "neumann_alpha": 1.0, "neumann_form": "inverse", "neumann_power_iters": 20,
    "neumann_early_stop": True, "solver_damping": 1e-2,
    "aggregate_reduction": "mean", "outer_optimizer": "adam", "outer_lr": 0.05, "spectrum_iters": 20,
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
    "inner_steps": "4000, a cap: on 300 real digits per domain the networks reached a median "
                   "stationarity of 0.10 with it, 41% of them before the cap "
                   "(docs/results/stationary.md)",
    "inner_lr": "0.3, annealed to 0 (cosine): at the paper's constant 0.01 the gradient norm "
                "ends about twice its start; from 0.05, annealed, CE ended at 0.14 of its start",
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
                      "near a stationary point (measured λ_min: median +0.009, 15 of 120 below 0); "
                      "a bias of order μ/λ in each direction",
    "aggregate_reduction": "mean: the library's default; with α = 1/λ̂_max the hypergradient "
                           "estimates dM/dω itself, not Algorithm 2's 1/α multiple",
    "outer_optimizer": "adam: a hypergradient at the true scale (not Algorithm 2's 1/α multiple) "
                       "needs another step size; Adam's does not depend on the scale",
    "outer_lr": "0.05: with Adam, ω moves by about 0.05 per coordinate and step at most",
    "spectrum_iters": "20: record λ_max and λ_min of each domain's Hessian (40 more products)",
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
