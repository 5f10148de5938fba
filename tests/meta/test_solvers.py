"""Linear solvers of the implicit gradient: Neumann series (closed form), CG, dense, under vmap."""

from __future__ import annotations

import functools

import pytest
import torch

from domainbed_itl.meta.solvers import cg, damped, dense, extreme_eigenvalues, neumann, power_iteration


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
def test_neumann_is_alpha_times_algorithm_2_as_printed(steps, alpha):
    a, b = _spd(5, seed=3), _rhs(5, seed=4)
    # Algorithm 2 by hand: v = p = b; J times v -= α A v, p += v; return p (no α in front).
    v, p = b.tolist(), b.tolist()
    rows = a.tolist()
    for _ in range(steps):
        av = [sum(r[k] * v[k] for k in range(5)) for r in rows]
        v = [vi - alpha * avi for vi, avi in zip(v, av)]
        p = [pi + vi for pi, vi in zip(p, v)]
    got = neumann(lambda w: a @ w, b, steps=steps, alpha=alpha)  # A⁻¹b: α times Algorithm 2's p
    torch.testing.assert_close(got, alpha * torch.tensor(p, dtype=torch.float64), rtol=1e-12,
                               atol=1e-12)


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


# ------------------------------------------------------------------ solves that cannot diverge


def _symmetric(eigenvalues, seed=0) -> torch.Tensor:
    """A symmetric matrix with exactly these eigenvalues (a random rotation of their diagonal)."""
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_power_iteration_estimates_the_largest_eigenvalue_from_below():
    eigenvalues = [0.2, 1.0, 4.0, 9.0, 30.0]
    a, b = _symmetric(eigenvalues), _rhs(5)
    estimates = [float(power_iteration(lambda v: a @ v, b, k)[1]) for k in (1, 5, 60)]
    assert all(e <= 30.0 + 1e-9 for e in estimates)
    assert estimates[-1] == pytest.approx(30.0, rel=1e-6)
    rayleigh, radius, q = power_iteration(lambda v: a @ v, b, 60)
    assert float(rayleigh) == pytest.approx(30.0, rel=1e-6) and float(q.norm()) == pytest.approx(1.0)
    diagonal = torch.tensor([1.0, -5.0, 2.0], dtype=torch.float64)  # dominant eigenvalue negative
    rayleigh, radius, _ = power_iteration(lambda v: diagonal * v, torch.ones(3, dtype=torch.float64), 80)
    assert (float(rayleigh), float(radius)) == pytest.approx((-5.0, 5.0), rel=1e-9)


@pytest.mark.parametrize("eigenvalues", [[-0.7, 0.1, 0.5, 2.0, 6.0], [-9.0, -1.0, 0.3, 4.0],
                                         [0.5, 1.0, 3.0]])
def test_extreme_eigenvalues_of_a_known_spectrum(eigenvalues):
    a, b = _symmetric(eigenvalues, seed=2), _rhs(len(eigenvalues), seed=5)
    high, low = extreme_eigenvalues(lambda v: a @ v, b, 300)
    assert (float(high), float(low)) == pytest.approx((max(eigenvalues), min(eigenvalues)), abs=1e-6)


def test_the_power_step_size_is_one_over_the_estimated_largest_eigenvalue():
    """α = alpha/λ̂ with λ̂ from power iteration: the series is the closed form at that α, and
    converges on a spectrum where the fixed α = 0.1 of before diverges (λ_max 30 > 2/0.1)."""
    a, b = _symmetric([0.5, 1.0, 4.0, 9.0, 30.0], seed=1), _rhs(5)
    _, radius, _ = power_iteration(lambda v: a @ v, b, 20)
    alpha = 1.0 / float(radius)
    assert 1 / 30 <= alpha < 2 / 30
    closed = neumann(lambda v: a @ v, b, steps=12, alpha=alpha)
    torch.testing.assert_close(neumann(lambda v: a @ v, b, steps=12, alpha=1.0, power_iters=20),
                               closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(neumann(lambda v: a @ v, b, steps=12, alpha=0.5, power_iters=20),
                               neumann(lambda v: a @ v, b, steps=12, alpha=0.5 * alpha),
                               rtol=1e-12, atol=1e-12)
    exact = torch.linalg.solve(a, b)
    assert (neumann(lambda v: a @ v, b, steps=200, alpha=0.1) - exact).norm() > 1e6
    torch.testing.assert_close(neumann(lambda v: a @ v, b, steps=2000, alpha=1.0, power_iters=20),
                               exact, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("solve", [dense, functools.partial(cg, maxiter=6, tol=0.0),
                                   functools.partial(neumann, steps=3000, alpha=1.0, power_iters=30)])
def test_damping_solves_the_lifted_system(solve):
    """(A + μI)x = b, against a dense solve; μ = 1 lifts an indefinite A (λ_min −0.6) to SPD."""
    a, b = _symmetric([-0.6, 0.2, 1.0, 2.5, 4.0, 5.0], seed=3), _rhs(6)
    got = damped(lambda v: a @ v, b, solve=solve, damping=1.0)
    exact = torch.linalg.solve(a + torch.eye(6, dtype=torch.float64), b)
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-7)


def _residual(a, b, x):
    return float((b - a @ x).norm())


@pytest.mark.parametrize("eigenvalues", [[0.3, 1.0, 2.0, 5.0], [-0.4, 0.3, 1.0, 5.0],
                                         [0.1, 1.0, 12.0]])
def test_early_stop_returns_the_iterate_of_smallest_residual(eigenvalues):
    """Never worse than any partial sum of the series, and exactly the best one; with an
    indefinite A (or α past 2/λ_max) the plain series diverges, the early-stopped one does not."""
    a, b = _symmetric(eigenvalues, seed=4), _rhs(len(eigenvalues), seed=6)
    alpha, steps = 0.15, 120
    iterates = [neumann(lambda v: a @ v, b, steps=j, alpha=alpha) for j in range(steps + 1)]
    residuals = [_residual(a, b, x) for x in iterates]
    got = neumann(lambda v: a @ v, b, steps=steps, alpha=alpha, early_stop=True)
    assert _residual(a, b, got) <= min(residuals) * (1 + 1e-12)
    torch.testing.assert_close(got, iterates[min(range(steps + 1), key=residuals.__getitem__)],
                               rtol=1e-12, atol=1e-12)
    if min(eigenvalues) < 0 or alpha * max(eigenvalues) > 2:
        assert residuals[-1] > 10 * _residual(a, b, got)


def test_early_stop_never_takes_a_diverged_iterate():
    a, b = _symmetric([1.0, 2.0, 500.0]), _rhs(3)
    got = neumann(lambda v: a @ v, b, steps=400, alpha=1.0, early_stop=True)  # |1 − 500| per step
    assert torch.isfinite(got).all()
    assert _residual(a, b, got) <= _residual(a, b, neumann(lambda v: a @ v, b, steps=0, alpha=1.0))


@pytest.mark.parametrize("solve", [
    functools.partial(neumann, steps=30, alpha=1.0, power_iters=10, early_stop=True),
    functools.partial(damped, solve=functools.partial(neumann, steps=20, alpha=1.0, power_iters=8),
                      damping=0.5),
    functools.partial(damped, solve=functools.partial(cg, maxiter=6, tol=1e-12), damping=0.1)])
def test_safe_solvers_work_under_vmap(solve):
    mats = torch.stack([_symmetric([-0.3 * s, 0.5, 2.0 + s, 7.0 - s], seed=s) for s in range(3)])
    rhs = torch.stack([_rhs(4, seed=s) for s in range(3)])
    batched = torch.func.vmap(lambda a, b: solve(lambda v: a @ v, b))(mats, rhs)
    looped = torch.stack([solve(lambda v, a=a: a @ v, b) for a, b in zip(mats, rhs)])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-10)
    spectra = torch.func.vmap(lambda a, b: torch.stack(extreme_eigenvalues(lambda v: a @ v, b, 50)))(
        mats, rhs)
    torch.testing.assert_close(spectra, torch.stack([torch.stack(extreme_eigenvalues(
        lambda v, a=a: a @ v, b, 50)) for a, b in zip(mats, rhs)]), rtol=1e-10, atol=1e-10)


def test_bad_safe_solver_arguments_are_named():
    a, b = _spd(3), _rhs(3)
    with pytest.raises(ValueError, match="power_iters must be >= 0, got -1"):
        neumann(lambda v: a @ v, b, power_iters=-1)
    with pytest.raises(ValueError, match="power iterations must be >= 1, got 0"):
        power_iteration(lambda v: a @ v, b, 0)
    with pytest.raises(ValueError, match="damping must be >= 0, got -0.5"):
        damped(lambda v: a @ v, b, solve=dense, damping=-0.5)
