"""Linear solvers for the implicit gradient: interchangeable callables `solve(matvec, b) -> x`.

Each solver approximates x = A⁻¹ b using only products `matvec(v) = A v` on flat 1-D tensors,
so A (the inner Hessian) is never formed. Configure one with functools.partial, as torchopt's
LinearSolver does:

    solve = functools.partial(neumann, steps=15, alpha=0.01)
    x = solve(matvec, b)

`neumann` and `cg` run a fixed number of products with no data-dependent Python control flow,
so they also work under torch.func.vmap (the batched meta-learner vmaps its hypergradients).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]
Solver = Callable[[MatVec, Tensor], Tensor]


def _check_rhs(b: Tensor) -> None:
    if b.dim() != 1:
        raise ValueError(f"solvers work on flat 1-D tensors, got b of shape {tuple(b.shape)}")


def neumann(matvec: MatVec, b: Tensor, steps: int = 15, alpha: float = 0.01,
            scale: bool = True) -> Tensor:
    """Truncated Neumann series α Σ_{j=0..steps} (I − αA)^j b ≈ A⁻¹ b (Eq. 6, Algorithm 2).

    Converges to A⁻¹ b as steps → ∞ when the eigenvalues of A lie in (0, 2/α). `scale=False`
    returns Σ_{j=0..steps} (I − αA)^j b without the factor α, as Algorithm 2 is printed: an
    estimate of A⁻¹ b / α, which makes every hypergradient 1/α times larger.
    """
    _check_rhs(b)
    if steps < 0:
        raise ValueError(f"neumann steps must be >= 0, got {steps!r}")
    if not alpha > 0:
        raise ValueError(f"neumann alpha must be > 0, got {alpha!r}")
    v, p = b, b
    for _ in range(steps):  # Algorithm 2: v -= α A v; p += v
        v = v - alpha * matvec(v)
        p = p + v
    return alpha * p if scale else p


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


SOLVERS = {"neumann": neumann, "cg": cg, "minres": minres, "dense": dense}
