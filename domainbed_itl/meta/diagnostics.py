"""Whether an outer step's hypergradients can be trusted (stationarity, solve residuals,
Hessian extremes, a MINRES reference), and the fields of the step's metrics record they
fill (files.schemas.MetricsRecord). Pure functions.
See docs/meta_learning.md#training-the-inner-networks-to-a-stationary-point.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor
from torch.func import vjp

from ..files.schemas import MetricsRecord
from . import solvers
from .hypergradient import adjoint_residual, implicit_grad

InnerGrad = Callable[..., Tensor]


def cosine(a: Tensor, b: Tensor) -> float:
    """The cosine of the angle between two flat vectors (0 when one is zero)."""
    return float(a @ b / (a.norm() * b.norm()).clamp_min(torch.finfo(a.dtype).tiny))


def inner_grad_norms(inner_grad: InnerGrad, thetas: Tensor, omega: Tensor, x: Tensor, y: Tensor,
                     index: Sequence[Tensor]) -> Tensor:
    """‖inner_grad(θ_i, ω)‖ = ‖∂L_ω/∂θ‖ of each flat θ_i on its examples index[i]: how stationary
    network i is (inner.stacked_grad_norms computes it on the stacked networks of inner training)."""
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


def means(per_domain: Dict[str, Tensor]) -> Dict[str, float]:
    """The record's averages (MetricsRecord.means) of the per-domain tensors `per_domain` holds."""
    return {name: float(per_domain[key].float().mean()) for name, key in MetricsRecord.means().items()
            if key in per_domain}


def step_fields(omega: Tensor, h: Tensor, per_domain: Dict[str, Tensor], trusted: Tensor,
                times: Sequence[float]) -> Dict[str, Any]:
    """The fields of an outer step's MetricsRecord that the diagnostics fill: the averages, the
    update's norm, the trusted domains, ω after the update, the per-domain values and the times.

    per_domain: tensors of one value (or row) per domain, keyed as MetricsRecord's PerDomain;
    times: the clock after the start, the inner training, the hypergradients, the update and
    evaluation, and the diagnostics.
    """
    t0, t1, t2, t3, t4 = times
    return {
        **means(per_domain),
        "hypergradient_norm": float(h.norm()),
        "trusted_domains": int(trusted.sum()),
        "omega": omega.tolist(),
        "per_domain": {k: v.tolist() for k, v in per_domain.items()},
        "time_inner_s": t1 - t0,
        "time_hypergradient_s": t2 - t1,
        "time_eval_s": t3 - t2,
        "time_diagnostics_s": t4 - t3,
        "time_step_s": t4 - t0,
    }
