"""Linear solvers of the implicit gradient: Neumann series (closed form), CG, dense, under vmap."""

from __future__ import annotations

import functools

import pytest
import torch

from domainbed_itl.meta.solvers import cg, dense, neumann


def _spd(n: int, seed: int = 0, low: float = 0.5, high: float = 3.0) -> torch.Tensor:
    """A symmetric positive-definite matrix with eigenvalues spread over [low, high]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(low, high, n, dtype=torch.float64)) @ q.T


def _rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("steps,alpha", [(0, 0.1), (1, 0.1), (15, 0.01), (40, 0.3)])
def test_neumann_is_exactly_the_scaled_truncated_series(steps, alpha):
    a, b = _spd(6), _rhs(6)
    eye = torch.eye(6, dtype=torch.float64)
    closed = alpha * sum(torch.linalg.matrix_power(eye - alpha * a, j) @ b for j in range(steps + 1))
    got = neumann(lambda v: a @ v, b, steps=steps, alpha=alpha)
    torch.testing.assert_close(got, closed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps,alpha", [(0, 0.1), (2, 0.1), (15, 0.01)])
def test_unscaled_neumann_is_algorithm_2_as_printed(steps, alpha):
    a, b = _spd(5, seed=3), _rhs(5, seed=4)
    # Algorithm 2 by hand: v = p = b; J times v -= α A v, p += v; return p (no α in front).
    v, p = b.tolist(), b.tolist()
    rows = a.tolist()
    for _ in range(steps):
        av = [sum(r[k] * v[k] for k in range(5)) for r in rows]
        v = [vi - alpha * avi for vi, avi in zip(v, av)]
        p = [pi + vi for pi, vi in zip(p, v)]
    got = neumann(lambda w: a @ w, b, steps=steps, alpha=alpha, scale=False)
    torch.testing.assert_close(got, torch.tensor(p, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got * alpha, neumann(lambda w: a @ w, b, steps=steps, alpha=alpha))


def test_neumann_converges_to_the_inverse():
    a, b = _spd(8), _rhs(8)
    got = neumann(lambda v: a @ v, b, steps=400, alpha=0.5)  # eigenvalues in (0, 2/α)
    torch.testing.assert_close(got, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)


def test_neumann_diverges_outside_its_radius():
    a, b = _spd(8), _rhs(8)
    got = neumann(lambda v: a @ v, b, steps=200, alpha=1.0)  # largest eigenvalue 3 > 2/α
    assert (got - torch.linalg.solve(a, b)).norm() > 1e6


def test_cg_solves_an_spd_system_in_n_steps():
    a, b = _spd(10, low=0.1, high=10.0), _rhs(10)
    got = cg(lambda v: a @ v, b, maxiter=10, tol=0.0)
    torch.testing.assert_close(got, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)


def test_cg_stays_put_after_convergence_and_handles_zero_rhs():
    a, b = _spd(5), _rhs(5)
    converged = cg(lambda v: a @ v, b, maxiter=50, tol=1e-10)
    assert torch.isfinite(converged).all()
    torch.testing.assert_close(converged, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    zero = cg(lambda v: a @ v, torch.zeros(5, dtype=torch.float64), maxiter=5)
    assert torch.equal(zero, torch.zeros(5, dtype=torch.float64))


def test_dense_materialises_any_matrix():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64) + 7 * torch.eye(7, dtype=torch.float64)
    b = _rhs(7)
    torch.testing.assert_close(dense(lambda v: a @ v, b), torch.linalg.solve(a, b))


@pytest.mark.parametrize("solve", [functools.partial(neumann, steps=30, alpha=0.3),
                                   functools.partial(cg, maxiter=6, tol=1e-12)])
def test_solvers_work_under_vmap(solve):
    mats = torch.stack([_spd(6, seed=s) for s in range(3)])
    rhs = torch.stack([_rhs(6, seed=s) for s in range(3)])
    batched = torch.func.vmap(lambda a, b: solve(lambda v: a @ v, b))(mats, rhs)
    looped = torch.stack([solve(lambda v, a=a: a @ v, b) for a, b in zip(mats, rhs)])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-10)


def test_bad_arguments_are_named():
    a, b = _spd(3), _rhs(3)
    with pytest.raises(ValueError, match=r"flat 1-D.*\(3, 1\)"):
        neumann(lambda v: a @ v, b[:, None])
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        neumann(lambda v: a @ v, b, steps=-1)
    with pytest.raises(ValueError, match="alpha must be > 0, got 0"):
        neumann(lambda v: a @ v, b, alpha=0)
    with pytest.raises(ValueError, match="maxiter must be >= 1, got 0"):
        cg(lambda v: a @ v, b, maxiter=0)
