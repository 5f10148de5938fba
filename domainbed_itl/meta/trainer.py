"""Algorithm 1: meta-learning the loss parameters ω by leave-one-domain-out implicit gradients.

`MetaTrainer.outer_step` trains one inner network per held-out domain, computes and aggregates
their implicit hypergradients and updates ω. See docs/meta_learning.md#how-the-meta-learner-is-built.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from ..files.schemas import MetricsRecord
from ..losses.families import ParameterRangeError, get_family, project
from . import aggregators, diagnostics, inner
from .config import MetaConfig
from .data import Domain, check_domains
from .draws import StepDraws, domain_indices, draw_step, every_source, step_generator
from .hypergradient import adjoint_residual, flatten_module, implicit_grad
from .inner import Params, init_params, mlp
from .objectives import get_objective
from .solvers import Solver
from .state import OuterState

__all__ = ["MetaConfig", "MetaTrainer", "NonFiniteError", "mlp", "step_generator"]

# Families of at most this many parameters have each domain's hypergradient recorded whole.
WHOLE_HYPERGRADIENTS = 16


class NonFiniteError(FloatingPointError):
    """A NaN or infinity in ω, a loss or a hypergradient, or ω outside its family's intervals (a
    focal γ < 0, say); the outer step is abandoned."""


def _first_nonfinite(values: Tensor) -> Optional[int]:
    bad = (~torch.isfinite(values)).nonzero()
    return None if bad.numel() == 0 else int(bad[0, 0])


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
        # ω, the outer optimiser, the steps done and (online IFT) the warm-started networks.
        self.state = OuterState(omega, config.outer_optimizer, config.outer_lr, self.device)
        self._solve = config.solve() if solve is None else solve
        self.objective = get_objective(config.objective)  # M of Eq. 2
        self._inner_optimizer = config.inner.optimizer()

        self.x = torch.cat([x for x, _ in domains]).to(self.device, torch.float32)
        self.y = torch.cat([y for _, y in domains]).to(self.device)
        self.y_heldout = (self.y if heldout_labels is None
                          else torch.cat(list(heldout_labels)).to(self.device))
        if self.y_heldout.shape != self.y.shape:
            raise ValueError(f"held-out labels of shape {tuple(self.y_heldout.shape)} for "
                             f"training labels of shape {tuple(self.y.shape)}")
        self._domain_index, self._source_index = domain_indices([len(y) for _, y in domains])
        self._every_source = every_source(self._source_index).to(self.device)  # hvp_all_sources
        self._init_model = mlp(self.x.shape[1], config.hidden, num_classes)
        self._model = copy.deepcopy(self._init_model).to(self.device)
        _, self.apply = flatten_module(self._model)

    @property
    def num_domains(self) -> int:
        """How many domains (and so inner trainings) each outer step has."""
        return len(self._domain_index)

    @property
    def omega(self) -> Tensor:
        """The loss parameters ω (the state's)."""
        return self.state.omega

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The outer optimiser (the state's)."""
        return self.state.optimizer

    @property
    def steps_done(self) -> int:
        """Outer steps done."""
        return self.state.steps_done

    def state_dict(self) -> Dict[str, Any]:
        """What `load_state_dict` needs to continue exactly (OuterState.state_dict)."""
        return self.state.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ω, the outer optimiser and any warm-started networks from `state_dict()`."""
        self.family.check(state["omega"])
        if self.config.warm_start and state["steps_done"] > 0 and "inner" not in state:
            raise ValueError("the state has no inner networks to warm-start from")
        self.state.load_state_dict(state)

    # The loss functions, pure in (θ, ω, data) for torch.func.

    def _source_loss(self, theta: Tensor, omega: Tensor, x: Tensor, y: Tensor) -> Tensor:
        loss = self.family.loss(self.apply(theta, x), y, omega)  # L_ω of Eq. 3
        decay = self.config.inner_weight_decay
        return loss + 0.5 * decay * theta.pow(2).sum() if decay else loss  # + λ/2‖θ‖²

    def _heldout_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self.apply(theta, x)
        return self.objective(logits, y), logits  # M of Eq. 2, the configured objective

    def _inner_grad(self, theta: Tensor, omega: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return grad(self._source_loss)(theta, omega, x, y)

    def _hypergradient(self, theta: Tensor, v: Tensor, x: Tensor, y: Tensor,
                       omega: Tensor) -> Dict[str, Tensor]:
        """dM/dω times the configured hypergradient_scale ("h"), the relative residual
        ‖Hu + v‖/‖v‖ of its solve ("residual") and, with spectrum_iters, estimates of the
        Hessian's extreme eigenvalues ("lambda_max", "lambda_min") on the Krylov space of v, the
        part of the spectrum the solve sees."""
        inner_grad = functools.partial(self._inner_grad, x=x, y=y)
        h, u = implicit_grad(inner_grad, theta, omega, v, self._solve, return_adjoint=True)  # Alg. 2
        out = {"h": self.config.hypergradient.hypergradient_scale * h,
               "residual": adjoint_residual(inner_grad, theta, omega, v, u)}
        if self.config.spectrum_iters:
            out["lambda_max"], out["lambda_min"] = diagnostics.hessian_extremes(
                inner_grad, theta, omega, v, self.config.spectrum_iters)
        return out

    # The steps of Algorithm 1.

    def _draw(self, step: int) -> StepDraws:
        """All random choices of outer step `step` (draws.py)."""
        c = self.config
        draws = draw_step(step_generator(c.seed, step), self._domain_index, self._source_index,
                          c.inner_steps, c.batch_size, c.hvp_batch, c.outer_batch, c.eval_size,
                          self.device)
        if c.hvp_all_sources:  # the same draws otherwise, so runs with and without it pair up
            draws = dataclasses.replace(draws, hvp=self._every_source)
        return draws

    def _start(self, draws: StepDraws, warm: bool) -> Tuple[Params, Dict[str, Any]]:
        """Algorithm 1, line 9: fresh networks from the step's seeds, or copies of the
        warm-started ones, with their inner-optimiser state."""
        if warm and self.state.warm is not None:
            return self.state.warm_copy()
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

    def _heldout(self, thetas: Tensor, draws: StepDraws) -> Tuple[Tensor, Dict[str, Tensor]]:
        """(∂M/∂θ per domain, {"heldout_loss": M, "heldout_acc": accuracy, "heldout_ce":
        cross-entropy}, each per domain)."""
        vs, measured = [], {"heldout_loss": [], "heldout_acc": [], "heldout_ce": []}
        for i in range(self.num_domains):
            idx, y = draws.heldout[i], self.y_heldout[draws.heldout[i]]
            v, (loss, logits) = grad_and_value(self._heldout_loss, has_aux=True)(
                thetas[i], self.x[idx], y)
            vs.append(v)
            logits = logits.detach()
            measured["heldout_loss"].append(loss.detach())
            measured["heldout_acc"].append((logits.argmax(1) == y).float().mean())
            measured["heldout_ce"].append(F.cross_entropy(logits, y))
        return torch.stack(vs), {k: torch.stack(v) for k, v in measured.items()}

    def _hypergradients(self, thetas: Tensor, vs: Tensor, draws: StepDraws,
                        omega: Tensor) -> Dict[str, Tensor]:
        """Algorithm 2 for every domain: `_hypergradient`'s values stacked, e.g. "h" (n, |ω|)."""
        x_hvp, y_hvp = self.x[draws.hvp], self.y[draws.hvp]
        if self.config.batched and self.config.hypergradient.batchable:
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

    def _update(self, step: int, h: Tensor, trusted: Tensor) -> Tuple[str, ...]:
        """Algorithm 1, line 16 (none when no domain is trusted), then ω projected into its
        family's intervals (families.project); returns the names of the entries projected. A
        non-finite ω, or one the projection cannot put in range, is undone."""
        if not torch.isfinite(h).all():
            raise NonFiniteError(f"outer step {step}: non-finite aggregated hypergradient")
        previous = self.state.snapshot()
        if trusted.any():
            self.state.update(h)
        if not torch.isfinite(self.omega).all():
            bad_omega = self.omega.tolist()
            self.state.restore(previous)
            raise NonFiniteError(f"outer step {step}: non-finite loss parameters ω after the update: "
                                 f"{bad_omega}")
        projected, moved = project(self.family, self.omega)
        try:
            self.family.check(projected)
        except ParameterRangeError as error:
            self.state.restore(previous)
            raise NonFiniteError(f"outer step {step}: the update took ω out of its family's range "
                                 f"and is undone: {error}") from None
        with torch.no_grad():
            self.omega.copy_(projected)
        return moved

    def heldout_objective(self, omega: Sequence[float] | Tensor, step: int) -> Dict[str, Any]:
        """M (the configured objective), accuracies and held-out CE of loss ω with the randomness
        of outer step `step`, no hypergradient: a MetricsRecord's fields (files.schemas) but step.

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
        _, heldout = self._heldout(thetas, draws)
        source_acc = diagnostics.accuracies(self.apply, thetas, self.x, self.y, draws.source_eval)
        per_domain = {**heldout, "inner_source_acc": source_acc,
                      "inner_loss": inner.tail_loss(run.losses, run.steps_used),
                      "source_heldout_gap": source_acc - heldout["heldout_acc"],
                      "inner_steps_used": torch.tensor(run.steps_used)}
        kept = ("heldout_loss", "heldout_acc", "heldout_ce", "inner_steps_used")
        fields: Dict[str, Any] = {"per_domain": {k: per_domain[k].tolist() for k in kept}}
        if run.start_norm is not None:
            fields["per_domain"]["stationarity"] = (run.final_norm / run.start_norm).tolist()
            fields["per_domain"]["inner_at_cap"] = self._at_cap(run).tolist()
            fields["inner_at_cap"] = int(self._at_cap(run).sum())
        record = MetricsRecord.build(step=step, **diagnostics.means(per_domain),
                                     objective=self.objective.name, **fields).line()
        del record["step"]  # a search's record numbers its own steps (cmaes: the generation)
        return record

    def _at_cap(self, run: inner.InnerRun) -> Tensor:
        """Per network, whether it ran to the inner_steps cap without meeting the stopping rule
        (a run with a stopping rule only)."""
        return (run.final_norm > self.config.inner_stop_ratio * run.start_norm).cpu()


    def _stationarity(self, thetas: Tensor, omega: Tensor, draws: StepDraws) -> Tensor:
        return diagnostics.inner_grad_norms(self._inner_grad, thetas, omega, self.x, self.y,
                                            draws.source_eval)

    def _reference(self, step: int, thetas: Tensor, vs: Tensor, hypergrads: Tensor,
                   draws: StepDraws, omega: Tensor) -> Dict[str, Any]:
        """One domain's hypergradient (the domains take turns) against a long MINRES solve."""
        d = (step // self.config.reference_every - 1) % self.num_domains
        idx = draws.hvp[d]
        inner_grad = functools.partial(self._inner_grad, x=self.x[idx], y=self.y[idx])
        return {"domain": d, **diagnostics.reference_comparison(
            inner_grad, thetas[d], omega, vs[d], hypergrads[d], self.config.reference_maxiter)}

    def _combine(self, hypergrads: Tensor, trusted: Tensor, draws: StepDraws) -> aggregators.Aggregate:
        """Algorithm 1, line 15: the trusted domains' hypergradients aggregated with the report of
        what the aggregator removed (aggregators.aggregate, which uses the plain mean or sum where
        it removes the whole update); a zero update when no domain is trusted."""
        if not trusted.any():
            return aggregators.Aggregate(torch.zeros_like(self.omega), None, None)
        return aggregators.aggregate(self.config.aggregate, hypergrads[trusted.to(hypergrads.device)],
                                     draws.surgery, self.config.aggregate_reduction)

    def outer_step(self) -> Dict[str, Any]:
        """One iteration of Algorithm 1's while loop; returns the step's metrics: those of the ω
        the step evaluated (`omega_evaluated`) and the ω after its update (`omega`)."""
        c, step = self.config, self.steps_done + 1
        draws, omega = self._draw(step), self.omega.detach().clone()
        t0 = clock(self.device)
        params, inner_state = self._start(draws, warm=c.warm_start)  # line 9
        start_norms = self._stationarity(inner.flat(params), omega, draws)
        run = self._train_inner(params, inner_state, draws, omega)  # lines 10-11
        thetas = inner.flat(params)
        t1 = clock(self.device)
        vs, heldout = self._heldout(thetas, draws)  # line 12
        if not torch.isfinite(heldout["heldout_loss"]).all():
            bad = int((~torch.isfinite(heldout["heldout_loss"])).nonzero()[0, 0])
            raise NonFiniteError(f"outer step {step}: non-finite held-out loss M on domain {bad}")
        solved = self._hypergradients(thetas, vs, draws, omega)  # lines 13-14
        trusted = self._trusted(step, solved["h"], solved["residual"])
        combined = self._combine(solved["h"], trusted, draws)  # line 15
        t2 = clock(self.device)
        projected = self._update(step, combined.update, trusted)  # line 16
        source_acc = diagnostics.accuracies(self.apply, thetas, self.x, self.y, draws.source_eval)
        t3 = clock(self.device)
        norms = (start_norms, self._stationarity(thetas, omega, draws))
        reference = (self._reference(step, thetas, vs, solved["h"], draws, omega)
                     if c.reference_every and step % c.reference_every == 0 else None)
        t4 = clock(self.device)
        if c.warm_start:
            self.state.warm = (params, inner_state)
        self.state.steps_done = step
        reported = {"projected": list(projected)}
        if reference is not None:
            reported["reference"] = reference
        return self._record(step, omega, run, {**heldout, "inner_source_acc": source_acc},
                            solved, norms, trusted, combined, (t0, t1, t2, t3, t4), reported).line()

    def _record(self, step: int, omega: Tensor, run: inner.InnerRun, measured: Dict[str, Tensor],
                solved: Dict[str, Tensor], norms: Tuple[Tensor, Tensor], trusted: Tensor,
                combined: aggregators.Aggregate, times: Sequence[float],
                reported: Dict[str, Any]) -> MetricsRecord:
        """The step's MetricsRecord: the fields diagnostics.step_fields fills, the objective's
        name, the ω evaluated, the aggregator's report, how many networks stopped at the cap,
        `reported` (the entries projected, the reference) and, for families of at most
        WHOLE_HYPERGRADIENTS parameters, each domain's hypergradient."""
        start_norms, end_norms = norms
        hypergrads = solved["h"]
        per_domain = {
            "inner_source_acc": measured["inner_source_acc"], "heldout_acc": measured["heldout_acc"],
            "heldout_loss": measured["heldout_loss"], "heldout_ce": measured["heldout_ce"],
            "source_heldout_gap": measured["inner_source_acc"] - measured["heldout_acc"],
            "inner_loss": inner.tail_loss(run.losses, run.steps_used),
            "inner_grad_norm": end_norms, "inner_grad_norm_start": start_norms,
            "stationarity": end_norms / start_norms,
            "inner_steps_used": torch.tensor(run.steps_used),
            "solver_residual": solved["residual"], "hypergradient_norm": hypergrads.norm(dim=1),
            **{f"hessian_{k}": solved[k] for k in ("lambda_max", "lambda_min") if k in solved}}
        if hypergrads.shape[1] <= WHOLE_HYPERGRADIENTS:
            per_domain["hypergradient"] = hypergrads
        extra: Dict[str, Any] = {}
        if run.start_norm is not None:
            per_domain["inner_at_cap"] = self._at_cap(run)
            extra["inner_at_cap"] = int(per_domain["inner_at_cap"].sum())
        return MetricsRecord.build(
            step=step, objective=self.objective.name, omega_evaluated=omega.tolist(),
            **diagnostics.step_fields(self.omega, combined.update, per_domain, trusted, times),
            **combined.record(), **extra, **reported)
