"""Whether an outer step's hypergradients can be trusted (stationarity, solve residuals,
Hessian extremes, a MINRES reference), and the step's metrics record. Pure functions.
See docs/meta_learning.md#training-the-inner-networks-to-a-stationary-point.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor
from torch.func import vjp

from . import solvers
from .hypergradient import adjoint_residual, implicit_grad

InnerGrad = Callable[..., Tensor]


def cosine(a: Tensor, b: Tensor) -> float:
    """The cosine of the angle between two flat vectors (0 when one is zero)."""
    return float(a @ b / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny))


def grad_norms(inner_grad: InnerGrad, thetas: Tensor, omega: Tensor, x: Tensor, y: Tensor,
               index: Sequence[Tensor]) -> Tensor:
    """‖∂L_ω/∂θ‖ of each θ_i on its examples index[i]: how stationary network i is."""
    return torch.stack([inner_grad(thetas[i], omega, x[idx], y[idx]).norm()
                        for i, idx in enumerate(index)])


def accuracies(apply: Callable[[Tensor, Tensor], Tensor], thetas: Tensor, x: Tensor, y: Tensor,
               index: Sequence[Tensor]) -> Tensor:
    """The accuracy of each network θ_i on its examples index[i]."""
    with torch.no_grad():
        return torch.stack([(apply(thetas[i], x[idx]).argmax(1) == y[idx]).float().mean()
                            for i, idx in enumerate(index)])


def hessian_extremes(inner_grad: InnerGrad, theta: Tensor, omega: Tensor, v0: Tensor,
                     iters: int) -> Tuple[Tensor, Tensor]:
    """Estimates (λ_max, λ_min) of the Hessian ∂²L/∂θ∂θᵀ at θ from 2·iters Hessian-vector
    products, by power iteration started at v0 (solvers.extreme_eigenvalues); vmap compatible."""
    _, hessian_t = vjp(lambda t: inner_grad(t, omega), theta)
    return solvers.extreme_eigenvalues(lambda w: hessian_t(w)[0], v0, iters)


def reference_comparison(inner_grad: InnerGrad, theta: Tensor, omega: Tensor, v: Tensor,
                         hypergradient: Tensor, maxiter: int) -> Dict[str, Any]:
    """One domain's hypergradient against the one a MINRES solve of `maxiter` iterations gives
    for the same system: their cosine and norm ratio, and the reference's own residual."""
    reference_solve = functools.partial(solvers.minres, maxiter=maxiter)
    h_ref, u = implicit_grad(inner_grad, theta, omega, v, reference_solve, return_adjoint=True)
    residual = adjoint_residual(inner_grad, theta, omega, v, u)
    return {"cosine": cosine(hypergradient, h_ref),
            "norm_ratio": float(hypergradient.norm() / h_ref.norm().clamp_min(1e-30)),
            "reference_residual": float(residual), "reference_maxiter": maxiter}


# A record's averages over the domains: its name -> the per-domain value it averages (a record
# holds those whose per-domain value it has; files.schemas.MetricsRecord reads them back).
MEANS = {
    "inner_source_acc": "inner_source_acc", "outer_heldout_acc": "heldout_acc",
    "outer_heldout_loss": "heldout_loss", "outer_heldout_ce": "heldout_ce",
    "source_heldout_gap": "source_heldout_gap",
    "inner_loss": "inner_loss", "inner_grad_norm": "inner_grad_norm",
    "inner_grad_norm_ratio": "stationarity", "inner_steps_used": "inner_steps_used",
    "solver_residual": "solver_residual", "hessian_lambda_max": "hessian_lambda_max",
    "hessian_lambda_min": "hessian_lambda_min",
}


def means(per_domain: Dict[str, Tensor]) -> Dict[str, float]:
    """The averages (MEANS) of the per-domain tensors `per_domain` holds, in MEANS' order."""
    return {name: float(per_domain[key].float().mean()) for name, key in MEANS.items()
            if key in per_domain}


def step_record(step: int, omega: Tensor, h: Tensor, per_domain: Dict[str, Tensor],
                trusted: Tensor, times: Sequence[float]) -> Dict[str, Any]:
    """The metrics record of one outer step (a line of metrics.jsonl).

    per_domain: tensors of one value (or row) per domain, keyed inner_source_acc, heldout_acc,
    heldout_loss (M, the objective), heldout_ce (held-out cross-entropy), source_heldout_gap,
    inner_loss, inner_grad_norm, inner_grad_norm_start, stationarity (their ratio),
    inner_steps_used, solver_residual, hypergradient_norm and optionally hessian_lambda_max,
    hessian_lambda_min, hypergradient (each domain's whole) and inner_at_cap (averaged at the
    top level as MEANS says); times: the clock after the start, the inner training, the hypergradients, the
    update and evaluation, and the diagnostics.
    """
    t0, t1, t2, t3, t4 = times
    averaged = means(per_domain)
    head = ("inner_source_acc", "outer_heldout_acc", "outer_heldout_loss", "outer_heldout_ce",
            "source_heldout_gap", "inner_loss")
    return {
        "step": step,
        **{k: averaged[k] for k in head if k in averaged},
        "hypergradient_norm": float(h.norm()),
        **{k: v for k, v in averaged.items() if k not in head},
        "trusted_domains": int(trusted.sum()),
        "omega": omega.tolist(),
        "per_domain": {k: v.tolist() for k, v in per_domain.items()},
        "time_inner_s": t1 - t0,
        "time_hypergradient_s": t2 - t1,
        "time_eval_s": t3 - t2,
        "time_diagnostics_s": t4 - t3,
        "time_step_s": t4 - t0,
    }
