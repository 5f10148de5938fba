"""Algorithm 1: meta-learning the loss parameters ω by leave-one-domain-out implicit gradients.

One outer step (Sec. 3.3): for every domain i, train a base network on the other domains with
the current loss L_ω (inner.py: SGD as in the paper, or momentum or Adam; freshly initialised,
or warm-started from the previous step's network), compute the implicit hypergradient of
M = cross-entropy on the held-out domain i (Algorithm 2, hypergradient.py), aggregate the n
hypergradients (PCGrad or mean, aggregators.py) and update ω with the outer optimiser. Each
step also records whether its hypergradients can be trusted: the inner gradient norm at the
returned θ (the IFT assumes it is 0), the relative residual of the linear solve and, every
`reference_every` steps, the cosine to a long MINRES solve on one domain.

Works on plain tensors, one (x, y) per domain (data.py); it never imports DomainBed. All the
randomness of outer step k comes from a generator seeded by (seed, k), so a run resumed from the
state after step k repeats the uninterrupted run exactly. `batched=True` trains the n
independent inner networks as one stack and computes their hypergradients under torch.func.vmap.

Base model: an MLP with ReLU whose default widths features → 256 → classes are two weight
layers as in Sec. 4.1. The paper's "1024-256-10" used 32×32 inputs; here the input is DomainBed's
image flattened as it is (28×28 = 784 for RotatedMNIST, 2×28×28 = 1568 for ColoredMNIST).
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from ..losses.families import get_family
from . import aggregators, inner, solvers
from .data import Domain, check_domains
from .hypergradient import adjoint_residual, flatten_module, implicit_grad
from .inner import INNER_OPTIMIZERS, InnerOptimizer, Params, init_params, mlp

OUTER_OPTIMIZERS = ("sgd", "adam")
NEUMANN_FORMS = ("inverse", "algorithm2")
_FLOAT32_MAX = torch.finfo(torch.float32).max


class NonFiniteError(FloatingPointError):
    """A NaN or infinity in ω, a loss or a hypergradient; the outer step is abandoned."""


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
            0 < value <= _FLOAT32_MAX):
        raise ValueError(f"{name} must be a positive number no larger than float32's maximum "
                         f"{_FLOAT32_MAX:.4g}, got {value!r}")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


@dataclass(frozen=True)
class MetaConfig:
    """Everything that determines a meta-training run's result (besides data, init and device).

    The defaults are the library's: a Neumann series that estimates H⁻¹ (`neumann_form`
    "inverse") and a mean over domains. `presets.META_PRESETS` holds named settings, among them the
    paper's protocol read literally (Algorithm 2 as printed, PCGrad summed).
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
    solver: str = "neumann"
    neumann_steps: int = 15
    neumann_alpha: float = 0.01
    neumann_form: str = "inverse"
    cg_maxiter: int = 15
    cg_tol: float = 1e-6
    hvp_batch: int = 256
    outer_batch: Optional[int] = None
    eval_size: Optional[int] = 2048
    aggregate: str = "pcgrad"
    aggregate_reduction: str = "mean"
    outer_optimizer: str = "sgd"
    outer_lr: float = 0.01
    batched: bool = False
    max_solver_residual: Optional[float] = None
    reference_every: int = 0
    reference_maxiter: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        get_family(self.family, self.order)
        for name in ("outer_steps", "inner_steps", "batch_size", "neumann_steps", "cg_maxiter",
                     "hvp_batch", "reference_maxiter"):
            _positive_int(name, getattr(self, name))
        for name in ("outer_batch", "eval_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("inner_lr", "neumann_alpha", "outer_lr"):
            _positive_float(name, getattr(self, name))
        if self.max_solver_residual is not None:
            _positive_float("max_solver_residual", self.max_solver_residual)
        if not isinstance(self.cg_tol, (int, float)) or not self.cg_tol >= 0:
            raise ValueError(f"cg_tol must be a number >= 0, got {self.cg_tol!r}")
        if (not isinstance(self.inner_momentum, (int, float)) or isinstance(self.inner_momentum, bool)
                or not 0 <= self.inner_momentum < 1):
            raise ValueError(f"inner_momentum must be a number in [0, 1), got {self.inner_momentum!r}")
        if not self.hidden:
            raise ValueError("hidden must list at least one width (two weight layers), got ()")
        for width in self.hidden:
            _positive_int("every hidden width", width)
        _choice("solver", self.solver, ("neumann", "cg"))
        _choice("neumann_form", self.neumann_form, NEUMANN_FORMS)
        _choice("aggregation", self.aggregate, tuple(aggregators.AGGREGATORS))
        _choice("aggregate_reduction", self.aggregate_reduction, aggregators.REDUCTIONS)
        _choice("outer optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        _choice("inner optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        for name in ("warm_start", "batched"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("seed", "reference_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    def solve(self) -> solvers.Solver:
        """The configured linear solver as a `solve(matvec, b)` callable."""
        if self.solver == "neumann":
            return functools.partial(solvers.neumann, steps=self.neumann_steps,
                                     alpha=self.neumann_alpha, scale=self.neumann_form == "inverse")
        return functools.partial(solvers.cg, maxiter=self.cg_maxiter, tol=self.cg_tol)

    @property
    def solution_scale(self) -> float:
        """c such that c·solve(H, b) estimates H⁻¹ b: α for Algorithm 2 as printed, else 1."""
        return self.neumann_alpha if self.solver == "neumann" and self.neumann_form == "algorithm2" else 1.0

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as a plain dict (stored in checkpoints and provenance)."""
        return asdict(self)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that drives all the randomness of outer step `step` of run `seed`."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _first_nonfinite(values: Tensor) -> Optional[int]:
    bad = (~torch.isfinite(values)).nonzero()
    return None if bad.numel() == 0 else int(bad[0, 0])


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny))


def _clone_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> Dict[str, Any]:
    return {k: ({n: t.detach().to(device, copy=True) for n, t in v.items()} if isinstance(v, dict)
                else v) for k, v in state.items()}


class MetaTrainer:
    """Algorithm 1 on in-memory domains. `outer_step()` performs one update of ω.

    domains: one (x float (n, features), y long (n,)) per domain, all with the same features.
    omega: the initial loss parameters; None gives the family's default (for Taylor losses the
    Taylor expansion of cross-entropy). device: where every tensor lives ('cpu', 'cuda', ...).
    solve: a linear solver `solve(matvec, b)` replacing the configured one (e.g. instrumented).
    """

    def __init__(self, domains: Sequence[Domain], num_classes: int, config: MetaConfig,
                 omega: Optional[Sequence[float] | Tensor] = None,
                 device: str | torch.device = "cpu", solve: Optional[solvers.Solver] = None):
        check_domains(domains, num_classes)
        self.config = config
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.family = get_family(config.family, config.order)
        if omega is None:
            omega = self.family.default_parameters(num_classes)
        self.family.check(omega)
        self.omega = torch.as_tensor(omega, dtype=torch.float32).detach().clone().to(self.device)
        if not torch.isfinite(self.omega).all():
            raise ValueError(f"initial loss parameters must be finite, got {self.omega.tolist()}")
        optimizer = torch.optim.SGD if config.outer_optimizer == "sgd" else torch.optim.Adam
        self.optimizer = optimizer([self.omega], lr=config.outer_lr)  # Algorithm 1, line 16
        self.steps_done = 0
        self._solve = config.solve() if solve is None else solve
        self._aggregate = functools.partial(aggregators.AGGREGATORS[config.aggregate],
                                            reduction=config.aggregate_reduction)
        self._inner_optimizer = InnerOptimizer(config.inner_optimizer, config.inner_lr,
                                               config.inner_momentum)
        # Warm start (online IFT): the inner networks and their optimiser state, kept between steps.
        self._warm: Optional[Tuple[Params, Dict[str, Any]]] = None

        sizes = [len(y) for _, y in domains]
        self.x = torch.cat([x for x, _ in domains]).to(self.device, torch.float32)
        self.y = torch.cat([y for _, y in domains]).to(self.device)
        bounds = np.cumsum([0, *sizes]).tolist()
        self._domain_index = [torch.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self._source_index = [torch.cat(self._domain_index[:i] + self._domain_index[i + 1:])
                              for i in range(len(domains))]
        self._init_model = mlp(self.x.shape[1], config.hidden, num_classes)
        self._model = copy.deepcopy(self._init_model).to(self.device)
        _, self.apply = flatten_module(self._model)

    @property
    def num_domains(self) -> int:
        """How many domains (and so inner trainings) each outer step has."""
        return len(self._domain_index)

    def state_dict(self) -> Dict[str, Any]:
        """What `load_state_dict` needs to continue exactly: steps done, ω, optimiser state and,
        with warm starts, the inner networks and their optimiser state."""
        state = {"steps_done": self.steps_done, "omega": self.omega.detach().cpu().clone(),
                 "optimizer": copy.deepcopy(self.optimizer.state_dict())}
        if self._warm is not None:
            params, inner_state = self._warm
            state["inner"] = {"params": {k: v.detach().cpu().clone() for k, v in params.items()},
                              "optimizer": _clone_state(inner_state, torch.device("cpu"))}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ω, the outer optimiser and any warm-started networks from `state_dict()`."""
        self.family.check(state["omega"])
        if self.config.warm_start and state["steps_done"] > 0 and "inner" not in state:
            raise ValueError("the state has no inner networks to warm-start from")
        with torch.no_grad():
            self.omega.copy_(state["omega"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self._warm = None
        if "inner" in state:
            params = {k: v.to(self.device, copy=True) for k, v in state["inner"]["params"].items()}
            self._warm = (params, _clone_state(state["inner"]["optimizer"], self.device))

    # The loss functions, pure in (θ, ω, data) for torch.func.

    def _source_loss(self, theta: Tensor, omega: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.family.loss(self.apply(theta, x), y, omega)  # L_ω of Eq. 3

    def _heldout_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self.apply(theta, x)
        return F.cross_entropy(logits, y), logits  # M of Eq. 2

    def _inner_grad(self, theta: Tensor, omega: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return grad(self._source_loss)(theta, omega, x, y)

    def _hypergradient(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor,
                       omega: Tensor) -> Tuple[Tensor, Tensor]:
        """(dM/dω, ‖H(c·u) + v‖/‖v‖): the hypergradient and the relative residual of its solve."""
        inner_grad = functools.partial(self._inner_grad, x=x, y=y)
        h, u = implicit_grad(inner_grad, theta, omega, v, self._solve, return_adjoint=True)  # Alg. 2
        return h, adjoint_residual(inner_grad, theta, omega, v, self.config.solution_scale * u)

    def _draw(self, step: int) -> Dict[str, Any]:
        """All random choices of outer step `step`, drawn in a fixed order on the CPU."""
        c = self.config
        g = step_generator(c.seed, step)
        n = self.num_domains

        def pick(index: Tensor, shape: Tuple[int, ...]) -> Tensor:
            return index[torch.randint(len(index), shape, generator=g)].to(self.device)

        def subset(index: Tensor, size: Optional[int]) -> Tensor:
            if size is None or size >= len(index):
                return index.to(self.device)
            return index[torch.randperm(len(index), generator=g)[:size]].to(self.device)

        return {
            "init_seeds": torch.randint(2 ** 62, (n,), generator=g).tolist(),
            "batches": torch.stack([pick(s, (c.inner_steps, c.batch_size)) for s in self._source_index]),
            "hvp": torch.stack([pick(s, (c.hvp_batch,)) for s in self._source_index]),
            "heldout": [subset(d, c.outer_batch) for d in self._domain_index],
            "source_eval": [subset(s, c.eval_size) for s in self._source_index],
            "surgery": torch.Generator().manual_seed(int(torch.randint(2 ** 62, (), generator=g))),
        }

    def _start(self, draws: Dict[str, Any], warm: bool) -> Tuple[Params, Dict[str, Any]]:
        """Algorithm 1, line 9: fresh networks from the step's seeds, or copies of the
        warm-started ones, with their inner-optimiser state."""
        if warm and self._warm is not None:
            return {k: v.clone() for k, v in self._warm[0].items()}, _clone_state(self._warm[1])
        params = init_params(self._init_model, draws["init_seeds"], self.device)
        return params, self._inner_optimizer.init_state(params)

    def _train_inner(self, params: Params, state: Dict[str, Any], draws: Dict[str, Any],
                     omega: Tensor) -> Tensor:
        """Algorithm 1, lines 10-11: train the networks in place; their losses (n, steps)."""
        loss = self.family.module(omega.tolist()).to(self.device)  # fixed L_ω, fused gradient
        losses = inner.train(params, loss, self._inner_optimizer, state, self.x, self.y,
                             draws["batches"], batched=self.config.batched)
        for i in range(self.num_domains):
            t_bad = _first_nonfinite(losses[i])
            if t_bad is not None:
                raise NonFiniteError(f"outer step {self.steps_done + 1}: non-finite inner training "
                                     f"loss when training without domain {i} (inner step {t_bad + 1})")
        return losses

    def _heldout(self, thetas: Tensor, draws: Dict[str, Any]) -> Tuple[Tensor, Tensor, Tensor]:
        """(∂M/∂θ per domain, M per domain, held-out accuracy per domain)."""
        vs, heldout_loss, heldout_acc = [], [], []
        for i in range(self.num_domains):
            idx = draws["heldout"][i]
            v, (loss, logits) = grad_and_value(self._heldout_loss, has_aux=True)(
                thetas[i], self.x[idx], self.y[idx])
            vs.append(v)
            heldout_loss.append(loss.detach())
            heldout_acc.append((logits.argmax(1) == self.y[idx]).float().mean())
        return torch.stack(vs), torch.stack(heldout_loss), torch.stack(heldout_acc)

    def heldout_objective(self, omega: Sequence[float] | Tensor, step: int) -> Dict[str, Any]:
        """M and accuracies of loss ω with the randomness of outer step `step`, no hypergradient.

        Trains fresh inner networks (never warm-started) exactly as `outer_step` would; for
        searches that only need the objective (e.g. evolution strategies).
        """
        omega = torch.as_tensor(omega, dtype=torch.float32).to(self.device)
        self.family.check(omega)
        draws = self._draw(step)
        params, state = self._start(draws, warm=False)
        losses = self._train_inner(params, state, draws, omega)
        thetas = inner.flat(params)
        _, heldout_loss, heldout_acc = self._heldout(thetas, draws)
        return {"outer_heldout_loss": float(heldout_loss.mean()),
                "outer_heldout_acc": float(heldout_acc.mean()),
                "inner_source_acc": float(self._source_accuracy(thetas, draws).mean()),
                "inner_loss": float(losses[:, -max(1, self.config.inner_steps // 10):].mean()),
                "per_domain": {"heldout_loss": heldout_loss.tolist(),
                               "heldout_acc": heldout_acc.tolist()}}

    def _source_accuracy(self, thetas: Tensor, draws: Dict[str, Any]) -> Tensor:
        with torch.no_grad():
            return torch.stack([
                (self.apply(thetas[i], self.x[idx]).argmax(1) == self.y[idx]).float().mean()
                for i, idx in enumerate(draws["source_eval"])])

    def _inner_grad_norms(self, thetas: Tensor, omega: Tensor, draws: Dict[str, Any]) -> Tensor:
        """‖∂L_ω/∂θ‖ at each θ_i on its `eval_size` source examples: stationarity. Recorded at
        the returned θ and, as a ratio to it, at the starting θ (which makes it scale-free)."""
        return torch.stack([self._inner_grad(thetas[i], omega, self.x[idx], self.y[idx]).norm()
                            for i, idx in enumerate(draws["source_eval"])])

    def _reference(self, step: int, thetas: Tensor, vs: Tensor, hypergrads: Tensor,
                   x_hvp: Tensor, y_hvp: Tensor, omega: Tensor) -> Dict[str, Any]:
        """The configured hypergradient of one domain against a long MINRES solve of the same
        system (MINRES, not CG: away from a minimum the Hessian is indefinite)."""
        c = self.config
        d = (step // c.reference_every - 1) % self.num_domains
        inner_grad = functools.partial(self._inner_grad, x=x_hvp[d], y=y_hvp[d])
        reference_solve = functools.partial(solvers.minres, maxiter=c.reference_maxiter)
        h_ref, u = implicit_grad(inner_grad, thetas[d], omega, vs[d], reference_solve,
                                 return_adjoint=True)
        residual = adjoint_residual(inner_grad, thetas[d], omega, vs[d], u)
        return {"domain": d, "cosine": _cosine(hypergrads[d], h_ref),
                "norm_ratio": float(hypergrads[d].norm() / h_ref.norm().clamp_min(1e-30)),
                "reference_residual": float(residual), "reference_maxiter": c.reference_maxiter}

    def outer_step(self) -> Dict[str, Any]:
        """One iteration of Algorithm 1's while loop; returns the step's metrics."""
        c, step, n = self.config, self.steps_done + 1, self.num_domains
        draws = self._draw(step)
        omega = self.omega.detach().clone()
        t0 = time.perf_counter()

        params, inner_state = self._start(draws, warm=c.warm_start)
        start_grad_norms = self._inner_grad_norms(inner.flat(params), omega, draws)
        losses = self._train_inner(params, inner_state, draws, omega)
        thetas = inner.flat(params)
        t1 = time.perf_counter()

        vs, heldout_loss_t, heldout_acc = self._heldout(thetas, draws)
        for i in range(n):
            if not torch.isfinite(heldout_loss_t[i]):
                raise NonFiniteError(f"outer step {step}: non-finite held-out loss M on domain {i}")
        x_hvp, y_hvp = self.x[draws["hvp"]], self.y[draws["hvp"]]
        if c.batched:
            hypergrads, residuals = vmap(self._hypergradient, in_dims=(0, 0, 0, 0, None))(
                thetas, vs, x_hvp, y_hvp, omega)
        else:
            pairs = [self._hypergradient(thetas[i], vs[i], x_hvp[i], y_hvp[i], omega) for i in range(n)]
            hypergrads = torch.stack([h for h, _ in pairs])
            residuals = torch.stack([r for _, r in pairs])
        # With max_solver_residual, a domain whose linear solve failed (e.g. a Neumann series that
        # diverges once αλ_max(H) > 2) gives no hypergradient; with none left, ω is not updated.
        trusted = torch.ones(n, dtype=torch.bool)
        if c.max_solver_residual is not None:
            trusted = (residuals <= c.max_solver_residual).cpu()
        for i in range(n):
            if trusted[i] and not torch.isfinite(hypergrads[i]).all():
                raise NonFiniteError(f"outer step {step}: non-finite hypergradient for held-out "
                                     f"domain {i}")
        h = (self._aggregate(hypergrads[trusted.to(hypergrads.device)], draws["surgery"])
             if trusted.any() else torch.zeros_like(self.omega))  # Algorithm 1, line 15
        if not torch.isfinite(h).all():
            raise NonFiniteError(f"outer step {step}: non-finite aggregated hypergradient")
        t2 = time.perf_counter()

        previous = self.state_dict()
        if trusted.any():
            self.omega.grad = h
            self.optimizer.step()  # Algorithm 1, line 16
            self.omega.grad = None
        if not torch.isfinite(self.omega).all():
            bad_omega = self.omega.tolist()
            self.load_state_dict(previous)
            raise NonFiniteError(f"outer step {step}: non-finite loss parameters ω after the update: "
                                 f"{bad_omega}")

        source_acc = self._source_accuracy(thetas, draws)
        t3 = time.perf_counter()
        grad_norms = self._inner_grad_norms(thetas, omega, draws)
        reference = (self._reference(step, thetas, vs, hypergrads, x_hvp, y_hvp, omega)
                     if c.reference_every and step % c.reference_every == 0 else None)
        t4 = time.perf_counter()
        if c.warm_start:
            self._warm = (params, inner_state)
        self.steps_done = step
        final = losses[:, -max(1, c.inner_steps // 10):].mean(1)
        record = {
            "step": step,
            "inner_source_acc": float(source_acc.mean()),
            "outer_heldout_acc": float(heldout_acc.mean()),
            "outer_heldout_loss": float(heldout_loss_t.mean()),
            "inner_loss": float(final.mean()),
            "hypergradient_norm": float(h.norm()),
            "inner_grad_norm": float(grad_norms.mean()),
            "inner_grad_norm_ratio": float((grad_norms / start_grad_norms).mean()),
            "solver_residual": float(residuals.mean()),
            "trusted_domains": int(trusted.sum()),
            "omega": self.omega.tolist(),
            "per_domain": {
                "inner_source_acc": source_acc.tolist(),
                "heldout_acc": heldout_acc.tolist(),
                "heldout_loss": heldout_loss_t.tolist(),
                "inner_loss": final.tolist(),
                "inner_grad_norm": grad_norms.tolist(),
                "inner_grad_norm_start": start_grad_norms.tolist(),
                "solver_residual": residuals.tolist(),
                "hypergradient_norm": hypergrads.norm(dim=1).tolist(),
            },
            "time_inner_s": t1 - t0,
            "time_hypergradient_s": t2 - t1,
            "time_eval_s": t3 - t2,
            "time_diagnostics_s": t4 - t3,
            "time_step_s": t4 - t0,
        }
        if reference is not None:
            record["reference"] = reference
        return record
