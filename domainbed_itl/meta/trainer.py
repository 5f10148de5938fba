"""Algorithm 1: meta-learning the loss parameters ω by leave-one-domain-out implicit gradients.

One outer step (Sec. 3.3): for every domain i, train a freshly initialised base network on the
other domains with the current loss L_ω (SGD), compute the implicit hypergradient of
M = cross-entropy on the held-out domain i (Algorithm 2, hypergradient.py), aggregate the n
hypergradients (PCGrad or mean, surgery.py) and update ω with the outer optimiser.

Works on plain tensors, one (x, y) per domain (data.py); it never imports DomainBed. All the
randomness of outer step k comes from a generator seeded by (seed, k), so a run resumed from the
state after step k repeats the uninterrupted run exactly. `batched=True` runs the n independent
inner trainings, and the n hypergradients, together under torch.func.vmap.

Base model: an MLP with ReLU whose default widths features → 256 → classes are two weight
layers as in Sec. 4.1. The paper's "1024-256-10" used 32×32 inputs; here the input is DomainBed's
image flattened as it is (28×28 = 784 for RotatedMNIST, 2×28×28 = 1568 for ColoredMNIST).
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from ..losses.families import get_family
from . import solvers, surgery
from .data import Domain, check_domains
from .hypergradient import flatten_module, implicit_grad

OUTER_OPTIMIZERS = ("sgd", "adam")
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


@dataclass(frozen=True)
class MetaConfig:
    """Everything that determines a meta-training run's result (besides data, init and device)."""

    family: str = "taylor"
    order: Optional[int] = 4
    outer_steps: int = 200
    inner_steps: int = 1000
    inner_lr: float = 0.01
    batch_size: int = 32
    hidden: Tuple[int, ...] = (256,)
    solver: str = "neumann"
    neumann_steps: int = 15
    neumann_alpha: float = 0.01
    cg_maxiter: int = 15
    cg_tol: float = 1e-6
    hvp_batch: int = 256
    outer_batch: Optional[int] = None
    eval_size: Optional[int] = 2048
    aggregate: str = "pcgrad"
    outer_optimizer: str = "sgd"
    outer_lr: float = 0.01
    batched: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        get_family(self.family, self.order)
        for name in ("outer_steps", "inner_steps", "batch_size", "neumann_steps", "cg_maxiter",
                     "hvp_batch"):
            _positive_int(name, getattr(self, name))
        for name in ("outer_batch", "eval_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("inner_lr", "neumann_alpha", "outer_lr"):
            _positive_float(name, getattr(self, name))
        if not isinstance(self.cg_tol, (int, float)) or not self.cg_tol >= 0:
            raise ValueError(f"cg_tol must be a number >= 0, got {self.cg_tol!r}")
        if not self.hidden:
            raise ValueError("hidden must list at least one width (two weight layers), got ()")
        for width in self.hidden:
            _positive_int("every hidden width", width)
        if self.solver not in ("neumann", "cg"):
            raise ValueError(f"unknown solver {self.solver!r}; expected 'neumann' or 'cg'")
        if self.aggregate not in surgery.AGGREGATORS:
            raise ValueError(f"unknown aggregation {self.aggregate!r}; expected one of "
                             f"{', '.join(surgery.AGGREGATORS)}")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"unknown outer optimizer {self.outer_optimizer!r}; expected one of "
                             f"{', '.join(OUTER_OPTIMIZERS)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    def solve(self) -> solvers.Solver:
        """The configured linear solver as a `solve(matvec, b)` callable."""
        if self.solver == "neumann":
            return functools.partial(solvers.neumann, steps=self.neumann_steps,
                                     alpha=self.neumann_alpha)
        return functools.partial(solvers.cg, maxiter=self.cg_maxiter, tol=self.cg_tol)

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as a plain dict (stored in checkpoints and provenance)."""
        return asdict(self)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that drives all the randomness of outer step `step` of run `seed`."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def mlp(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """The base network: Linear-ReLU blocks of widths `hidden`, then a linear classifier."""
    widths = [in_features, *hidden]
    layers: List[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))


def _first_nonfinite(values: Tensor) -> Optional[int]:
    bad = (~torch.isfinite(values)).nonzero()
    return None if bad.numel() == 0 else int(bad[0, 0])


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
        self._aggregate = surgery.AGGREGATORS[config.aggregate]

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
        """What `load_state_dict` needs to continue exactly: steps done, ω and optimiser state."""
        return {"steps_done": self.steps_done, "omega": self.omega.detach().cpu().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ω and the outer optimiser from `state_dict()`'s output."""
        self.family.check(state["omega"])
        with torch.no_grad():
            self.omega.copy_(state["omega"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])

    # The loss functions, pure in (θ, ω, data) for torch.func.

    def _source_loss(self, theta: Tensor, omega: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return self.family.loss(self.apply(theta, x), y, omega)  # L_ω of Eq. 3

    def _source_loss_params(self, params: Dict[str, Tensor], omega: Tensor, x: Tensor,
                            y: Tensor) -> Tensor:
        return self.family.loss(functional_call(self._model, params, (x,)), y, omega)  # Eq. 3

    def _heldout_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self.apply(theta, x)
        return F.cross_entropy(logits, y), logits  # M of Eq. 2

    def _inner_grad(self, theta: Tensor, omega: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return grad(self._source_loss)(theta, omega, x, y)

    def _hypergradient(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor, omega: Tensor) -> Tensor:
        inner = functools.partial(self._inner_grad, x=x, y=y)
        return implicit_grad(inner, theta, omega, v, self._solve)  # Algorithm 2

    def _init_params(self, seed: int) -> Dict[str, Tensor]:
        """Fresh random weights (Algorithm 1, line 9): the model's own init, seeded, on the CPU."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            for module in self._init_model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            return {name: p.detach().to(self.device, copy=True)
                    for name, p in self._init_model.named_parameters()}

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

    def _train_inner(self, seeds: List[int], batches: Tensor, omega: Tensor) -> Tuple[Tensor, Tensor]:
        """SGD on L_ω from fresh weights, one network per seed (Algorithm 1, lines 9-11).

        Returns the flat θ* of every network (rows, in flatten_module's order) and the training
        losses. The networks train as parameter dicts updated in place and are flattened once at
        the end: under vmap, weights viewed out of one flat batched vector make every matmul
        copy them, and fresh multi-megabyte tensors every step cost page faults.
        """
        c = self.config
        step = grad_and_value(self._source_loss_params)
        losses = torch.empty(batches.shape[:2], device=self.device)
        if c.batched:
            initial = [self._init_params(s) for s in seeds]
            params = {name: torch.stack([p[name] for p in initial]) for name in initial[0]}
            step = vmap(step, in_dims=(0, None, 0, 0))
            for t in range(c.inner_steps):
                idx = batches[:, t]
                g, losses[:, t] = step(params, omega, self.x[idx], self.y[idx])
                for name, p in params.items():
                    p.add_(g[name], alpha=-c.inner_lr)
            return torch.cat([p.reshape(len(seeds), -1) for p in params.values()], dim=1), losses
        thetas = []
        for i, seed in enumerate(seeds):
            params = self._init_params(seed)
            for t in range(c.inner_steps):
                idx = batches[i, t]
                g, losses[i, t] = step(params, omega, self.x[idx], self.y[idx])
                for name, p in params.items():
                    p.add_(g[name], alpha=-c.inner_lr)
            thetas.append(torch.cat([p.reshape(-1) for p in params.values()]))
        return torch.stack(thetas), losses

    def outer_step(self) -> Dict[str, Any]:
        """One iteration of Algorithm 1's while loop; returns the step's metrics."""
        c, step, n = self.config, self.steps_done + 1, self.num_domains
        draws = self._draw(step)
        omega = self.omega.detach().clone()
        t0 = time.perf_counter()

        thetas, losses = self._train_inner(draws["init_seeds"], draws["batches"], omega)
        for i in range(n):
            t_bad = _first_nonfinite(losses[i])
            if t_bad is not None:
                raise NonFiniteError(f"outer step {step}: non-finite inner training loss when training "
                                     f"without domain {i} (inner step {t_bad + 1})")
        t1 = time.perf_counter()

        heldout_loss, heldout_acc, vs = [], [], []
        for i in range(n):
            idx = draws["heldout"][i]
            v, (loss, logits) = grad_and_value(self._heldout_loss, has_aux=True)(
                thetas[i], self.x[idx], self.y[idx])
            vs.append(v)
            heldout_loss.append(loss)
            heldout_acc.append((logits.argmax(1) == self.y[idx]).float().mean())
        vs_t, heldout_loss_t = torch.stack(vs), torch.stack(heldout_loss)
        for i in range(n):
            if not torch.isfinite(heldout_loss_t[i]):
                raise NonFiniteError(f"outer step {step}: non-finite held-out loss M on domain {i}")
        x_hvp, y_hvp = self.x[draws["hvp"]], self.y[draws["hvp"]]
        if c.batched:
            hypergrads = vmap(self._hypergradient, in_dims=(0, 0, 0, 0, None))(
                thetas, vs_t, x_hvp, y_hvp, omega)
        else:
            hypergrads = torch.stack([self._hypergradient(thetas[i], vs_t[i], x_hvp[i], y_hvp[i], omega)
                                      for i in range(n)])
        for i in range(n):
            if not torch.isfinite(hypergrads[i]).all():
                raise NonFiniteError(f"outer step {step}: non-finite hypergradient for held-out "
                                     f"domain {i}")
        h = self._aggregate(hypergrads, draws["surgery"])  # Algorithm 1, line 15
        if not torch.isfinite(h).all():
            raise NonFiniteError(f"outer step {step}: non-finite aggregated hypergradient")
        t2 = time.perf_counter()

        previous = self.state_dict()
        self.omega.grad = h
        self.optimizer.step()  # Algorithm 1, line 16
        self.omega.grad = None
        if not torch.isfinite(self.omega).all():
            bad_omega = self.omega.tolist()
            self.load_state_dict(previous)
            raise NonFiniteError(f"outer step {step}: non-finite loss parameters ω after the update: "
                                 f"{bad_omega}")

        source_acc = []
        with torch.no_grad():
            for i in range(n):
                idx = draws["source_eval"][i]
                source_acc.append((self.apply(thetas[i], self.x[idx]).argmax(1) == self.y[idx])
                                  .float().mean())
        t3 = time.perf_counter()
        self.steps_done = step
        final = losses[:, -max(1, c.inner_steps // 10):].mean(1)
        return {
            "step": step,
            "inner_source_acc": float(torch.stack(source_acc).mean()),
            "outer_heldout_acc": float(torch.stack(heldout_acc).mean()),
            "outer_heldout_loss": float(heldout_loss_t.mean()),
            "inner_loss": float(final.mean()),
            "hypergradient_norm": float(h.norm()),
            "omega": self.omega.tolist(),
            "per_domain": {
                "inner_source_acc": [float(a) for a in source_acc],
                "heldout_acc": [float(a) for a in heldout_acc],
                "heldout_loss": heldout_loss_t.tolist(),
                "inner_loss": final.tolist(),
            },
            "time_inner_s": t1 - t0,
            "time_hypergradient_s": t2 - t1,
            "time_eval_s": t3 - t2,
            "time_step_s": t3 - t0,
        }
