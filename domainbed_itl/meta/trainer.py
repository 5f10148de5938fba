"""Algorithm 1: meta-learning the loss parameters ω by leave-one-domain-out implicit gradients.

One outer step (Sec. 3.3): for every domain i, train a base network on the other domains with
the current loss L_ω (inner.py: SGD as in the paper, or momentum or Adam; freshly initialised,
or warm-started from the previous step's network; for a fixed number of steps or, with a
stopping rule, until it is near a stationary point), compute the implicit hypergradient of
M = cross-entropy on the held-out domain i (Algorithm 2, hypergradient.py), aggregate the n
hypergradients (PCGrad or mean, aggregators.py) and update ω with the outer optimiser. Each
step also records whether its hypergradients can be trusted (diagnostics.py).

Works on plain tensors, one (x, y) per domain (data.py); it never imports DomainBed. The
configuration is config.py's MetaConfig; all the randomness of outer step k comes from
draws.py's generator seeded by (seed, k), so a run resumed from the state after step k repeats
the uninterrupted run exactly. `batched=True` trains the n independent inner networks as one
stack and computes their hypergradients under torch.func.vmap.

Base model: an MLP with ReLU whose default widths features → 256 → classes are two weight
layers as in Sec. 4.1. The paper's "1024-256-10" used 32×32 inputs; here the input is DomainBed's
image flattened as it is (28×28 = 784 for RotatedMNIST, 2×28×28 = 1568 for ColoredMNIST).
"""

from __future__ import annotations

import copy
import functools
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from ..losses.families import ParameterRangeError, get_family
from . import aggregators, diagnostics, inner
from .config import MetaConfig
from .data import Domain, check_domains
from .draws import StepDraws, domain_indices, draw_step, step_generator
from .hypergradient import adjoint_residual, flatten_module, implicit_grad
from .inner import Params, init_params, mlp
from .solvers import Solver

__all__ = ["MetaConfig", "MetaTrainer", "NonFiniteError", "mlp", "step_generator"]


class NonFiniteError(FloatingPointError):
    """A NaN or infinity in ω, a loss or a hypergradient, or ω outside its family's intervals (a
    focal γ < 0, say); the outer step is abandoned."""


def _first_nonfinite(values: Tensor) -> Optional[int]:
    bad = (~torch.isfinite(values)).nonzero()
    return None if bad.numel() == 0 else int(bad[0, 0])


def _clone_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> Dict[str, Any]:
    return {k: ({n: t.detach().to(device, copy=True) for n, t in v.items()} if isinstance(v, dict)
                else v) for k, v in state.items()}


def clock(device: torch.device) -> float:
    """The time once the device has finished the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class MetaTrainer:
    """Algorithm 1 on in-memory domains. `outer_step()` performs one update of ω.

    domains: one (x float (n, features), y long (n,)) per domain, all with the same features.
    omega: the initial loss parameters; None gives the family's default (for Taylor losses the
    Taylor expansion of cross-entropy). device: where every tensor lives ('cpu', 'cuda', ...).
    solve: a linear solver `solve(matvec, b)` replacing the configured one (e.g. instrumented).
    heldout_labels: per domain, the labels M and held-out accuracy use when it is held out (the
    planted task's clean labels); None: the training labels.
    """

    def __init__(self, domains: Sequence[Domain], num_classes: int, config: MetaConfig,
                 omega: Optional[Sequence[float] | Tensor] = None,
                 device: str | torch.device = "cpu", solve: Optional[Solver] = None,
                 heldout_labels: Optional[Sequence[Tensor]] = None):
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
            raise ValueError(f"initial loss parameters must be finite as 32-bit floats (below "
                             f"3.4e38 in size), got {[float(v) for v in omega]}")
        optimizer = torch.optim.SGD if config.outer_optimizer == "sgd" else torch.optim.Adam
        self.optimizer = optimizer([self.omega], lr=config.outer_lr)  # Algorithm 1, line 16
        self.steps_done = 0
        self._solve = config.solve() if solve is None else solve
        self._aggregate = functools.partial(aggregators.AGGREGATORS[config.aggregate],
                                            reduction=config.aggregate_reduction)
        self._inner_optimizer = config.inner.optimizer()
        # Warm start (online IFT): the inner networks and their optimiser state, kept between steps.
        self._warm: Optional[Tuple[Params, Dict[str, Any]]] = None

        self.x = torch.cat([x for x, _ in domains]).to(self.device, torch.float32)
        self.y = torch.cat([y for _, y in domains]).to(self.device)
        self.y_heldout = (self.y if heldout_labels is None
                          else torch.cat(list(heldout_labels)).to(self.device))
        if self.y_heldout.shape != self.y.shape:
            raise ValueError(f"held-out labels of shape {tuple(self.y_heldout.shape)} for "
                             f"training labels of shape {tuple(self.y.shape)}")
        self._domain_index, self._source_index = domain_indices([len(y) for _, y in domains])
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
        loss = self.family.loss(self.apply(theta, x), y, omega)  # L_ω of Eq. 3
        decay = self.config.inner_weight_decay
        return loss + 0.5 * decay * theta.pow(2).sum() if decay else loss  # + λ/2‖θ‖²

    def _heldout_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self.apply(theta, x)
        return F.cross_entropy(logits, y), logits  # M of Eq. 2

    def _inner_grad(self, theta: Tensor, omega: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return grad(self._source_loss)(theta, omega, x, y)

    def _hypergradient(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor,
                       omega: Tensor) -> Dict[str, Tensor]:
        """dM/dω ("h"), the relative residual ‖H(c·u) + v‖/‖v‖ of its solve ("residual") and,
        with spectrum_iters, estimates of the Hessian's extreme eigenvalues ("lambda_max",
        "lambda_min") on the Krylov space of v, the part of the spectrum the solve sees."""
        inner_grad = functools.partial(self._inner_grad, x=x, y=y)
        h, u = implicit_grad(inner_grad, theta, omega, v, self._solve, return_adjoint=True)  # Alg. 2
        out = {"h": h, "residual": adjoint_residual(inner_grad, theta, omega, v,
                                                    self.config.solution_scale * u)}
        if self.config.spectrum_iters:
            out["lambda_max"], out["lambda_min"] = diagnostics.hessian_extremes(
                inner_grad, theta, omega, v, self.config.spectrum_iters)
        return out

    # The steps of Algorithm 1.

    def _draw(self, step: int) -> StepDraws:
        """All random choices of outer step `step` (draws.py)."""
        c = self.config
        return draw_step(step_generator(c.seed, step), self._domain_index, self._source_index,
                         c.inner_steps, c.batch_size, c.hvp_batch, c.outer_batch, c.eval_size,
                         self.device)

    def _start(self, draws: StepDraws, warm: bool) -> Tuple[Params, Dict[str, Any]]:
        """Algorithm 1, line 9: fresh networks from the step's seeds, or copies of the
        warm-started ones, with their inner-optimiser state."""
        if warm and self._warm is not None:
            return {k: v.clone() for k, v in self._warm[0].items()}, _clone_state(self._warm[1])
        params = init_params(self._init_model, draws.init_seeds, self.device)
        return params, self._inner_optimizer.init_state(params)

    def _train_inner(self, params: Params, state: Dict[str, Any], draws: StepDraws,
                     omega: Tensor) -> inner.InnerRun:
        """Algorithm 1, lines 10-11: train the networks in place (to the stopping rule, if any,
        judged on the step's source-evaluation subsets); their losses and steps taken."""
        loss = self.family.module(omega.tolist()).to(self.device)  # fixed L_ω, fused gradient
        settings = self.config.inner
        run = inner.fit(params, loss, self._inner_optimizer, state, self.x, self.y, draws.batches,
                        draws.source_eval, self.config.batched, settings.learning_rates(),
                        settings.inner_weight_decay, settings.stop_rule())
        for i, used in enumerate(run.steps_used):
            t_bad = _first_nonfinite(run.losses[i, :used])
            if t_bad is not None:
                raise NonFiniteError(f"outer step {self.steps_done + 1}: non-finite inner training "
                                     f"loss when training without domain {i} (inner step {t_bad + 1})")
        return run

    def _heldout(self, thetas: Tensor, draws: StepDraws) -> Tuple[Tensor, Tensor, Tensor]:
        """(∂M/∂θ per domain, M per domain, held-out accuracy per domain)."""
        vs, heldout_loss, heldout_acc = [], [], []
        for i in range(self.num_domains):
            idx = draws.heldout[i]
            v, (loss, logits) = grad_and_value(self._heldout_loss, has_aux=True)(
                thetas[i], self.x[idx], self.y_heldout[idx])
            vs.append(v)
            heldout_loss.append(loss.detach())
            heldout_acc.append((logits.argmax(1) == self.y_heldout[idx]).float().mean())
        return torch.stack(vs), torch.stack(heldout_loss), torch.stack(heldout_acc)

    def _hypergradients(self, thetas: Tensor, vs: Tensor, draws: StepDraws,
                        omega: Tensor) -> Dict[str, Tensor]:
        """Algorithm 2 for every domain: `_hypergradient`'s values stacked, e.g. "h" (n, |ω|)."""
        x_hvp, y_hvp = self.x[draws.hvp], self.y[draws.hvp]
        if self.config.batched:
            return vmap(self._hypergradient, in_dims=(0, 0, 0, 0, None))(thetas, vs, x_hvp, y_hvp, omega)
        outs = [self._hypergradient(thetas[i], vs[i], x_hvp[i], y_hvp[i], omega)
                for i in range(self.num_domains)]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}

    def _trusted(self, step: int, hypergrads: Tensor, residuals: Tensor) -> Tensor:
        """Which domains' hypergradients enter the update: with max_solver_residual, not those
        whose solve failed (e.g. a Neumann series that diverges once αλ_max(H) > 2)."""
        trusted = torch.ones(self.num_domains, dtype=torch.bool)
        if self.config.max_solver_residual is not None:
            trusted = (residuals <= self.config.max_solver_residual).cpu()
        for i in range(self.num_domains):
            if trusted[i] and not torch.isfinite(hypergrads[i]).all():
                raise NonFiniteError(f"outer step {step}: non-finite hypergradient for held-out "
                                     f"domain {i}")
        return trusted

    def _update(self, step: int, h: Tensor, trusted: Tensor) -> None:
        """Algorithm 1, line 16 (none when no domain is trusted); a non-finite ω, or one outside
        its family's intervals, is undone."""
        if not torch.isfinite(h).all():
            raise NonFiniteError(f"outer step {step}: non-finite aggregated hypergradient")
        previous = self.state_dict()
        if trusted.any():
            self.omega.grad = h
            self.optimizer.step()
            self.omega.grad = None
        if not torch.isfinite(self.omega).all():
            bad_omega = self.omega.tolist()
            self.load_state_dict(previous)
            raise NonFiniteError(f"outer step {step}: non-finite loss parameters ω after the update: "
                                 f"{bad_omega}")
        try:
            self.family.check(self.omega)
        except ParameterRangeError as error:
            self.load_state_dict(previous)
            raise NonFiniteError(f"outer step {step}: the update took ω out of its family's range "
                                 f"and is undone: {error}") from None

    def heldout_objective(self, omega: Sequence[float] | Tensor, step: int) -> Dict[str, Any]:
        """M and accuracies of loss ω with the randomness of outer step `step`, no hypergradient.

        Trains fresh inner networks (never warm-started) exactly as `outer_step` would; for
        searches that only need the objective (e.g. evolution strategies).
        """
        omega = torch.as_tensor(omega, dtype=torch.float32).to(self.device)
        try:
            self.family.check(omega)
        except ParameterRangeError as error:  # a search's candidate: it fails, the search goes on
            raise NonFiniteError(f"loss parameters outside the family's range: {error}") from None
        draws = self._draw(step)
        params, state = self._start(draws, warm=False)
        run = self._train_inner(params, state, draws, omega)
        thetas = inner.flat(params)
        _, heldout_loss, heldout_acc = self._heldout(thetas, draws)
        source_acc = diagnostics.accuracies(self.apply, thetas, self.x, self.y, draws.source_eval)
        record = {"outer_heldout_loss": float(heldout_loss.mean()),
                  "outer_heldout_acc": float(heldout_acc.mean()),
                  "inner_source_acc": float(source_acc.mean()),
                  "inner_loss": float(inner.tail_loss(run.losses, run.steps_used).mean()),
                  "source_heldout_gap": float((source_acc - heldout_acc).mean()),
                  "inner_steps_used": sum(run.steps_used) / len(run.steps_used),
                  "per_domain": {"heldout_loss": heldout_loss.tolist(),
                                 "heldout_acc": heldout_acc.tolist(),
                                 "inner_steps_used": run.steps_used}}
        if run.start_norm is not None:
            record["per_domain"]["stationarity"] = (run.final_norm / run.start_norm).tolist()
        return record

    def _stationarity(self, thetas: Tensor, omega: Tensor, draws: StepDraws) -> Tensor:
        return diagnostics.grad_norms(self._inner_grad, thetas, omega, self.x, self.y,
                                      draws.source_eval)

    def _reference(self, step: int, thetas: Tensor, vs: Tensor, hypergrads: Tensor,
                   draws: StepDraws, omega: Tensor) -> Dict[str, Any]:
        """One domain's hypergradient (the domains take turns) against a long MINRES solve."""
        d = (step // self.config.reference_every - 1) % self.num_domains
        idx = draws.hvp[d]
        inner_grad = functools.partial(self._inner_grad, x=self.x[idx], y=self.y[idx])
        return {"domain": d, **diagnostics.reference_comparison(
            inner_grad, thetas[d], omega, vs[d], hypergrads[d], self.config.reference_maxiter)}

    def outer_step(self) -> Dict[str, Any]:
        """One iteration of Algorithm 1's while loop; returns the step's metrics."""
        c, step = self.config, self.steps_done + 1
        draws, omega = self._draw(step), self.omega.detach().clone()
        t0 = clock(self.device)
        params, inner_state = self._start(draws, warm=c.warm_start)  # line 9
        start_norms = self._stationarity(inner.flat(params), omega, draws)
        run = self._train_inner(params, inner_state, draws, omega)  # lines 10-11
        thetas = inner.flat(params)
        t1 = clock(self.device)
        vs, heldout_loss, heldout_acc = self._heldout(thetas, draws)  # line 12
        if not torch.isfinite(heldout_loss).all():
            bad = int((~torch.isfinite(heldout_loss)).nonzero()[0, 0])
            raise NonFiniteError(f"outer step {step}: non-finite held-out loss M on domain {bad}")
        solved = self._hypergradients(thetas, vs, draws, omega)  # lines 13-14
        hypergrads, residuals = solved["h"], solved["residual"]
        trusted = self._trusted(step, hypergrads, residuals)
        h = (self._aggregate(hypergrads[trusted.to(hypergrads.device)], draws.surgery)
             if trusted.any() else torch.zeros_like(self.omega))  # line 15
        t2 = clock(self.device)
        self._update(step, h, trusted)  # line 16
        source_acc = diagnostics.accuracies(self.apply, thetas, self.x, self.y, draws.source_eval)
        t3 = clock(self.device)
        end_norms = self._stationarity(thetas, omega, draws)
        reference = (self._reference(step, thetas, vs, hypergrads, draws, omega)
                     if c.reference_every and step % c.reference_every == 0 else None)
        t4 = clock(self.device)
        if c.warm_start:
            self._warm = (params, inner_state)
        self.steps_done = step
        per_domain = {
            "inner_source_acc": source_acc, "heldout_acc": heldout_acc, "heldout_loss": heldout_loss,
            "source_heldout_gap": source_acc - heldout_acc,
            "inner_loss": inner.tail_loss(run.losses, run.steps_used),
            "inner_grad_norm": end_norms, "inner_grad_norm_start": start_norms,
            "stationarity": end_norms / start_norms,
            "inner_steps_used": torch.tensor(run.steps_used),
            "solver_residual": residuals, "hypergradient_norm": hypergrads.norm(dim=1),
            **{f"hessian_{k}": solved[k] for k in ("lambda_max", "lambda_min") if k in solved}}
        record = diagnostics.step_record(step, self.omega, h, per_domain, trusted, (t0, t1, t2, t3, t4))
        if reference is not None:
            record["reference"] = reference
        return record
