"""The implicit hypergradient against the exact one (dense Hessian solve) and finite differences.

Two inner problems solved to convergence in float64:
- L2-regularised logistic regression with per-feature decay exp(ω_k) (convex);
- a tiny tanh MLP trained with the order-4 Taylor loss L_ω plus weight decay (ω = 12 params).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian, jacrev

from domainbed_itl.losses import cross_entropy_taylor_init, taylor_loss
from domainbed_itl.meta.hypergradient import adjoint_residual, flatten_module, implicit_grad
from domainbed_itl.meta.solvers import cg, dense, minres, neumann
from domainbed_itl.meta.config import SolverSettings

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _newton(loss, theta, omega, iters=30):
    """Minimise loss(θ, ω) over θ by Newton's method from θ, near enough to a strict minimum."""
    for _ in range(iters):
        g = grad(loss)(theta, omega)
        if g.norm() < 1e-13:
            return theta
        theta = theta - torch.linalg.solve(hessian(loss)(theta, omega), g)
    raise AssertionError(f"Newton did not converge: gradient norm {float(g.norm()):.2e}")


def _lbfgs(loss, theta, omega):
    """Approximately minimise loss(θ, ω) over θ with L-BFGS (plain autograd), to start Newton."""
    theta = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss(theta, omega)
        value.backward()
        return value

    opt.step(closure)
    return theta.detach()


class Problem:
    """An inner loss L(θ, ω) with its optimum θ*, an outer loss M(θ), and the exact dM/dω."""

    def __init__(self, inner, outer, theta, omega):
        self.inner, self.outer, self.omega = inner, outer, omega
        self.theta = _newton(inner, theta, omega)
        self.v = grad(outer)(self.theta)
        self.hess = hessian(inner)(self.theta, omega)
        mixed = jacrev(grad(inner), argnums=1)(self.theta, omega)  # ∂²L/∂θ∂ω, (|θ|, |ω|)
        self.exact = -torch.linalg.solve(self.hess, self.v) @ mixed  # Eq. 4-5, dense

    def inner_grad(self, theta, omega):
        return grad(self.inner)(theta, omega)

    def implicit(self, solve):
        return implicit_grad(self.inner_grad, self.theta, self.omega, self.v, solve)

    def retrained_outer(self, omega):
        return self.outer(_newton(self.inner, self.theta, omega))

    def neumann_alpha(self):
        return 1.0 / float(torch.linalg.eigvalsh(self.hess).max())


@functools.lru_cache(maxsize=None)
def logistic() -> Problem:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=g, dtype=DT)
    xs, xv = torch.randn(120, 5, generator=g, dtype=DT), torch.randn(80, 5, generator=g, dtype=DT) + 0.3
    ys = (xs @ w + torch.randn(120, generator=g, dtype=DT) > 0).to(DT)
    yv = (xv @ w + torch.randn(80, generator=g, dtype=DT) > 0).to(DT)

    def inner(theta, omega):
        return (F.binary_cross_entropy_with_logits(xs @ theta, ys)
                + 0.5 * (omega.exp() * theta ** 2).sum())

    def outer(theta):
        return F.binary_cross_entropy_with_logits(xv @ theta, yv)

    omega = torch.tensor([-2.0, -1.0, -3.0, 0.0, -1.5], dtype=DT)
    return Problem(inner, outer, torch.zeros(5, dtype=DT), omega)


@functools.lru_cache(maxsize=None)
def taylor_mlp() -> Problem:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    theta0, apply = flatten_module(net)
    g = torch.Generator().manual_seed(1)
    centres = 2 * torch.randn(3, 4, generator=g, dtype=DT)
    ys, yv = torch.arange(60) % 3, torch.arange(45) % 3
    xs = centres[ys] + torch.randn(60, 4, generator=g, dtype=DT)
    xv = centres[yv] + torch.randn(45, 4, generator=g, dtype=DT) + 0.5

    def inner(theta, omega):
        return taylor_loss(apply(theta, xs), ys, omega, 4) + 0.05 * (theta ** 2).sum()

    def outer(theta):
        return F.cross_entropy(apply(theta, xv), yv)

    omega = torch.tensor(cross_entropy_taylor_init(4, 3), dtype=DT)
    problem = Problem(inner, outer, _lbfgs(inner, theta0, omega), omega)
    assert torch.linalg.eigvalsh(problem.hess).min() > 0, "the MLP optimum must be a strict minimum"
    return problem


PROBLEMS = {"logistic": logistic, "taylor_mlp": taylor_mlp}


def _cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("name", PROBLEMS)
def test_dense_solve_gives_the_exact_implicit_gradient(name):
    p = PROBLEMS[name]()
    torch.testing.assert_close(p.implicit(dense), p.exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("solver", ["neumann", "cg"])
def test_iterative_solvers_match_the_exact_gradient(name, solver):
    p = PROBLEMS[name]()
    if solver == "cg":
        solve = functools.partial(cg, maxiter=2 * p.theta.numel(), tol=1e-12)
    else:
        kappa = float(torch.linalg.cond(p.hess))
        solve = functools.partial(neumann, steps=int(12 * kappa), alpha=p.neumann_alpha())
    got = p.implicit(solve)
    assert _cosine(got, p.exact) >= 0.999
    assert (got - p.exact).norm() <= 1e-3 * p.exact.norm()


@pytest.mark.parametrize("name", PROBLEMS)
def test_the_configured_minres_solve_gives_the_exact_implicit_gradient(name):
    """solver minres, as a run configures it (damping 0), on the problems' positive-definite
    Hessians: the exact gradient; its damping is the lifted system's."""
    from domainbed_itl.meta.config import MetaConfig

    p = PROBLEMS[name]()
    n = p.theta.numel()
    got = p.implicit(MetaConfig(solver="minres", minres_maxiter=4 * n, minres_tol=1e-14).solve())
    torch.testing.assert_close(got, p.exact, rtol=1e-6, atol=1e-10)
    damped = MetaConfig(solver="minres", minres_maxiter=4 * n, minres_tol=1e-14, solver_damping=0.5)
    lifted = p.implicit(lambda matvec, b: dense(lambda w: matvec(w) + 0.5 * w, b))
    torch.testing.assert_close(p.implicit(damped.solve()), lifted, rtol=1e-6, atol=1e-10)


def test_paper_neumann_setting_is_the_closed_form_series():
    """J = 15, α = 0.01 (Sec. 4.1): dM/dω = -(α Σ_j (I - αH)^j v)ᵀ ∂²L/∂θ∂ω, exactly."""
    p = taylor_mlp()
    alpha, eye = 0.01, torch.eye(p.theta.numel(), dtype=DT)
    series = alpha * sum(torch.linalg.matrix_power(eye - alpha * p.hess, j) for j in range(16))
    mixed = jacrev(grad(p.inner), argnums=1)(p.theta, p.omega)
    got = p.implicit(functools.partial(neumann, steps=15, alpha=alpha))
    torch.testing.assert_close(got, -(series @ p.v) @ mixed, rtol=1e-9, atol=1e-12)


def test_algorithm_2_as_printed_is_the_series_without_alpha():
    """The paper preset's form: dM/dω = -(Σ_j (I - αH)^j v)ᵀ ∂²L/∂θ∂ω, 1/α times the inverse form."""
    p = taylor_mlp()
    alpha, eye = 0.01, torch.eye(p.theta.numel(), dtype=DT)
    series = sum(torch.linalg.matrix_power(eye - alpha * p.hess, j) for j in range(16))
    mixed = jacrev(grad(p.inner), argnums=1)(p.theta, p.omega)
    scale = SolverSettings(neumann_form="algorithm2", neumann_alpha=alpha).hypergradient_scale
    got = scale * p.implicit(functools.partial(neumann, steps=15, alpha=alpha))
    torch.testing.assert_close(got, -(series @ p.v) @ mixed, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_adjoint_residual_is_the_closed_form_on_a_known_hessian(name):
    """For the Neumann solve u = -α Σ_{j<=J} (I-αH)^j v, Hu + v = (I-αH)^{J+1} v exactly."""
    p = PROBLEMS[name]()
    alpha, steps = p.neumann_alpha(), 6
    _, u = implicit_grad(p.inner_grad, p.theta, p.omega, p.v,
                         functools.partial(neumann, steps=steps, alpha=alpha), return_adjoint=True)
    eye = torch.eye(p.theta.numel(), dtype=DT)
    closed = torch.linalg.matrix_power(eye - alpha * p.hess, steps + 1) @ p.v
    got = adjoint_residual(p.inner_grad, p.theta, p.omega, p.v, u)
    torch.testing.assert_close(got, closed.norm() / p.v.norm(), rtol=1e-9, atol=1e-12)
    exact_u = -torch.linalg.solve(p.hess, p.v)
    assert float(adjoint_residual(p.inner_grad, p.theta, p.omega, p.v, exact_u)) < 1e-10
    assert float(adjoint_residual(p.inner_grad, p.theta, p.omega, p.v, torch.zeros_like(u))) == 1.0


def test_minres_solves_an_indefinite_system_where_cg_breaks_down():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=DT))
    a = q @ torch.diag(torch.tensor([-3.0, -1.0, -0.5] + [0.5 + k for k in range(9)], dtype=DT)) @ q.T
    b = torch.randn(12, generator=g, dtype=DT)
    exact = torch.linalg.solve(a, b)
    torch.testing.assert_close(minres(lambda v: a @ v, b, maxiter=100, tol=1e-12), exact,
                               rtol=1e-8, atol=1e-8)
    # CG divides by p'Ap, which an indefinite matrix can make 0: diag(1, -1) with b = (1, 1).
    a2, b2 = torch.diag(torch.tensor([1.0, -1.0], dtype=DT)), torch.ones(2, dtype=DT)
    assert not torch.isfinite(cg(lambda v: a2 @ v, b2, maxiter=2, tol=0.0)).all()
    torch.testing.assert_close(minres(lambda v: a2 @ v, b2, maxiter=10),
                               torch.tensor([1.0, -1.0], dtype=DT))


@pytest.mark.parametrize("name,coords", [("logistic", [0, 1, 2, 3, 4]), ("taylor_mlp", [0, 1, 6, 8, 9])])
def test_matches_central_finite_differences_after_retraining(name, coords):
    p = PROBLEMS[name]()
    got = p.implicit(functools.partial(cg, maxiter=2 * p.theta.numel(), tol=1e-14))
    eps = 1e-5
    for k in coords:
        e = torch.zeros_like(p.omega)
        e[k] = eps
        fd = (p.retrained_outer(p.omega + e) - p.retrained_outer(p.omega - e)) / (2 * eps)
        torch.testing.assert_close(got[k], fd, rtol=1e-5, atol=1e-9)


def test_uses_one_hessian_product_per_neumann_step_and_never_a_dense_hessian():
    p = taylor_mlp()
    sizes = []

    def counting(matvec, b):
        return neumann(lambda v: sizes.append(tuple(matvec(v).shape)) or matvec(v), b, steps=7)

    p.implicit(counting)
    assert sizes == [tuple(p.theta.shape)] * 7


def test_vmapped_hypergradients_equal_the_loop():
    p = logistic()
    thetas = torch.stack([p.theta, 1.1 * p.theta])
    vs = torch.stack([p.v, -p.v])
    solve = functools.partial(neumann, steps=30, alpha=p.neumann_alpha())
    batched = torch.func.vmap(lambda t, v: implicit_grad(p.inner_grad, t, p.omega, v, solve))(thetas, vs)
    looped = torch.stack([implicit_grad(p.inner_grad, t, p.omega, v, solve) for t, v in zip(thetas, vs)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-14)


def test_flatten_module_is_the_module_as_a_pure_function():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    net[1].running_mean.fill_(0.3)
    theta, apply = flatten_module(net)
    x = torch.randn(5, 3)
    assert theta.numel() == sum(q.numel() for q in net.parameters())
    torch.testing.assert_close(apply(theta, x), net(x))
    shifted = apply(theta + 1.0, x)
    with torch.no_grad():
        for q in net.parameters():
            q.add_(1.0)
    torch.testing.assert_close(shifted, net(x))
    with pytest.raises(ValueError, match=r"shape \(34,\), got \(33,\)"):
        apply(theta[:-1], x)
    with pytest.raises(ValueError, match="no parameters"):
        flatten_module(nn.ReLU())
