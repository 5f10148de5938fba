"""Linear solvers for the implicit gradient: interchangeable callables `solve(matvec, b) -> x`
with x ≈ A⁻¹ b from products with A only (configure one with functools.partial, as torchopt's
LinearSolver). See docs/meta_learning.md#how-the-meta-learner-is-built.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]
Solver = Callable[[MatVec, Tensor], Tensor]


def _check_rhs(b: Tensor) -> None:
    if b.dim() != 1:
        raise ValueError(f"solvers work on flat 1-D tensors, got b of shape {tuple(b.shape)}")


def power_iteration(matvec: MatVec, v0: Tensor, iters: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(q·Aq, ‖Aq‖, Aq/‖Aq‖) for the unit vector q after iters − 1 power iterations from v0.

    For symmetric A, ‖Aq‖ estimates the largest |eigenvalue| from below and q·Aq the signed
    dominant eigenvalue. Started from b, it sees the eigenvectors b has a component along: the
    ones a Neumann series for A⁻¹b multiplies. `iters` products; vmap compatible.
    """
    if iters < 1:
        raise ValueError(f"power iterations must be >= 1, got {iters!r}")
    tiny = torch.finfo(v0.dtype).tiny
    q = v0 / v0.norm().clamp_min(tiny)
    for _ in range(iters):
        w = matvec(q)
        rayleigh, radius = q @ w, w.norm()
        q = w / radius.clamp_min(tiny)
    return rayleigh, radius, q


def extreme_eigenvalues(matvec: MatVec, v0: Tensor, iters: int) -> Tuple[Tensor, Tensor]:
    """Estimates (λ_max, λ_min) of symmetric A from 2·iters products, started at v0.

    Power iteration finds the dominant eigenvalue λ_d (ρ = |λ_d|); then power iteration on
    ρI − sA, s = sign(λ_d), whose eigenvalues ρ − sλ are all >= 0, finds its top one, ρ − sλ_o,
    with λ_o the extreme at the other end of the spectrum (λ_min when λ_d > 0, else λ_max).
    """
    dominant, radius, _ = power_iteration(matvec, v0, iters)
    sign = torch.where(dominant < 0, -1.0, 1.0).to(v0.dtype)
    shifted, _, _ = power_iteration(lambda w: radius * w - sign * matvec(w), v0, iters)
    other = sign * (radius - shifted)  # ρ − σ_top = λ_min if λ_d > 0; −(ρ − σ_top) = λ_max if not
    return torch.maximum(dominant, other), torch.minimum(dominant, other)


def neumann(matvec: MatVec, b: Tensor, steps: int = 15, alpha: float = 0.01,
            power_iters: int = 0, early_stop: bool = False) -> Tensor:
    """Truncated Neumann series α Σ_{j=0..steps} (I − αA)^j b ≈ A⁻¹ b (Eq. 6, Algorithm 2).

    Converges to A⁻¹ b as steps → ∞ when the eigenvalues of A lie in (0, 2/α). (Algorithm 2 as
    printed returns the sum without the factor α; that 1/α is a scale on the outer update,
    config.SolverSettings.hypergradient_scale, not the solver's.)

    power_iters > 0: α is `alpha`/λ̂ with λ̂ the largest |eigenvalue| of A from that many power
    iterations started at b (alpha 1: α = 1/λ̂; below 2 the series converges on the positive
    part of the spectrum as long as λ̂ is within a factor 2/alpha of the truth). early_stop:
    return the partial sum with the smallest residual ‖b − A x_j‖ = ‖(I − αA)^{j+1} b‖ (one
    more product); for symmetric A that residual is log-convex in j, so this is the iterate
    where it stopped decreasing, never worse than any iterate of the series.
    """
    _check_rhs(b)
    if steps < 0:
        raise ValueError(f"neumann steps must be >= 0, got {steps!r}")
    if not alpha > 0:
        raise ValueError(f"neumann alpha must be > 0, got {alpha!r}")
    if power_iters < 0:
        raise ValueError(f"neumann power_iters must be >= 0, got {power_iters!r}")
    if power_iters:
        _, radius, _ = power_iteration(matvec, b, power_iters)
        alpha = alpha / radius.clamp_min(torch.finfo(b.dtype).tiny)
    if early_stop:
        return _neumann_best(matvec, b, steps, alpha)
    v, p = b, b
    for _ in range(steps):  # Algorithm 2: v -= α A v; p += v
        v = v - alpha * matvec(v)
        p = p + v
    return alpha * p


def _neumann_best(matvec: MatVec, b: Tensor, steps: int, alpha: float | Tensor) -> Tensor:
    """The Neumann partial sum of smallest residual; the residual of α·p_j is v_{j+1}."""
    v, p = b, b
    best, best_residual = b, torch.full((), torch.inf, dtype=b.dtype, device=b.device)
    for j in range(steps + 1):
        v = v - alpha * matvec(v)  # b − A(α p_j)
        residual = v.norm()
        better = residual < best_residual  # False for NaN: a diverged iterate is never taken
        best = torch.where(better, p, best)
        best_residual = torch.where(better, residual, best_residual)
        if j < steps:
            p = p + v
    return alpha * best


def damped(matvec: MatVec, b: Tensor, solve: Solver, damping: float) -> Tensor:
    """`solve` applied to (A + μI) x = b, μ = damping: ridge (Tikhonov) damping of the system."""
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    return solve(lambda w: matvec(w) + damping * w, b)


def cg(matvec: MatVec, b: Tensor, maxiter: int = 15, tol: float = 1e-6) -> Tensor:
    """Conjugate gradient for symmetric positive-definite A, starting from x = 0.

    Runs exactly `maxiter` products (a fixed cost, vmap compatible); once the residual satisfies
    ‖r‖ ≤ tol·‖b‖ the iterate stops changing.
    """
    _check_rhs(b)
    if maxiter < 1:
        raise ValueError(f"cg maxiter must be >= 1, got {maxiter!r}")
    if not tol >= 0:
        raise ValueError(f"cg tol must be >= 0, got {tol!r}")
    threshold = (tol * torch.linalg.vector_norm(b)) ** 2
    x = torch.zeros_like(b)
    r, p = b, b
    rs = r @ r
    for _ in range(maxiter):
        ap = matvec(p)
        active = rs > threshold
        step = torch.where(active, rs / (p @ ap), torch.zeros_like(rs))
        x = x + step * p
        r = r - step * ap
        rs_new = r @ r
        p = r + torch.where(active, rs_new / rs, torch.zeros_like(rs)) * p
        rs = rs_new
    return x


def minres(matvec: MatVec, b: Tensor, maxiter: int = 200, tol: float = 1e-8) -> Tensor:
    """MINRES (scipy.sparse.linalg.minres) for symmetric A that may be indefinite.

    The reference solver of the diagnostics: a Hessian away from a minimum has negative
    eigenvalues, on which CG breaks down. Runs in float64 on the CPU, calling `matvec` once per
    iteration; data-dependent, so not for vmap.
    """
    import numpy as np
    from scipy.sparse.linalg import LinearOperator
    from scipy.sparse.linalg import minres as scipy_minres

    _check_rhs(b)
    if maxiter < 1:
        raise ValueError(f"minres maxiter must be >= 1, got {maxiter!r}")

    def product(x: "np.ndarray") -> "np.ndarray":
        return matvec(torch.from_numpy(x).to(b)).detach().cpu().double().numpy()

    n = b.numel()
    operator = LinearOperator((n, n), matvec=product, dtype=np.float64)
    x, _ = scipy_minres(operator, b.detach().cpu().double().numpy(), rtol=tol, maxiter=maxiter)
    return torch.from_numpy(x).to(b)


def dense(matvec: MatVec, b: Tensor) -> Tensor:
    """Exact solve: materialise A column by column from matvec, then torch.linalg.solve. Tests only."""
    _check_rhs(b)
    eye = torch.eye(b.numel(), dtype=b.dtype, device=b.device)
    a = torch.stack([matvec(e) for e in eye], dim=1)
    return torch.linalg.solve(a, b)

