"""The calibration trap (issue 24, item 2): on a tiny leave-one-domain-out task, label smoothing
with a larger ε gives the held-out domain a higher accuracy *and* a higher cross-entropy. The
implicit hypergradient of held-out CE then points the search away from accuracy (towards smaller
ε), while the calibrated CE and the smooth error rate point it towards larger ε. Ground truth:
linear softmax networks trained to their unique optimum (label smoothing with weight decay is
strictly convex in θ) by Newton's method, and finite differences through that training.

Every assertion names the objective it is about, so the test fails if the objectives are swapped.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import grad, hessian

from domainbed_itl.losses import get_family
from domainbed_itl.losses.families import project
from domainbed_itl.meta.data import synthetic_domains
from domainbed_itl.meta.hypergradient import implicit_grad
from domainbed_itl.meta.objectives import accuracy, get_objective
from domainbed_itl.meta.solvers import dense

FAMILY = get_family("label_smoothing")
FEATURES, CLASSES, WEIGHT_DECAY = 10, 3, 1e-3
ACCURACY_SEEKING = ("calibrated_ce", "soft_error")


@functools.lru_cache(maxsize=None)
def _task():
    """Three source domains of 15 examples (rotated 0°, 30°, 60°), a held-out domain at 90° of
    3000 examples (the same class means: synthetic_domains draws them first from the seed)."""
    small = synthetic_domains(4, 15, FEATURES, CLASSES, seed=0, degrees_per_domain=30.0)
    large = synthetic_domains(4, 3000, FEATURES, CLASSES, seed=0, degrees_per_domain=30.0)
    x = torch.cat([x for x, _ in small.domains[:3]]).double()
    y = torch.cat([y for _, y in small.domains[:3]])
    x_out, y_out = large.domains[3]
    return x, y, x_out.double(), y_out


def _logits(theta, x):
    return x @ theta[:FEATURES * CLASSES].view(FEATURES, CLASSES) + theta[FEATURES * CLASSES:]


def _inner_loss(theta, omega):
    x, y, _, _ = _task()
    return FAMILY.loss(_logits(theta, x), y, omega) + WEIGHT_DECAY / 2 * (theta * theta).sum()


@functools.lru_cache(maxsize=None)
def _train(epsilon: float) -> torch.Tensor:
    """θ*(ε): Newton's method from zero to the unique minimiser (gradient norm < 1e-10)."""
    _task()  # drawn once, outside torch.func's transforms
    omega = torch.tensor([epsilon], dtype=torch.float64)
    theta = torch.zeros((FEATURES + 1) * CLASSES, dtype=torch.float64)
    for _ in range(40):
        gradient = grad(_inner_loss)(theta, omega)
        if gradient.norm() < 1e-10:
            return theta
        theta = theta - torch.linalg.solve(hessian(_inner_loss)(theta, omega), gradient)
    raise AssertionError(f"Newton's method did not converge at epsilon={epsilon}")


def _heldout(theta, name):
    _, _, x_out, y_out = _task()
    logits = _logits(theta, x_out)
    return get_objective(name)(logits, y_out), float(accuracy(logits, y_out))


def _hypergradient(epsilon: float, name: str) -> float:
    """dM/dε by the package's implicit_grad (exact solve) at θ*(ε)."""
    theta, omega = _train(epsilon), torch.tensor([epsilon], dtype=torch.float64)
    v = grad(lambda t: _heldout(t, name)[0])(theta)
    return float(implicit_grad(grad(_inner_loss), theta, omega, v, dense)[0])


def test_the_trap_more_smoothing_is_more_accurate_and_has_a_higher_heldout_ce():
    (ce_low, acc_low), (ce_high, acc_high) = (_heldout(_train(e), "heldout_ce") for e in (0.1, 0.4))
    assert acc_high > acc_low + 0.005
    assert float(ce_high) > float(ce_low) + 0.05


@pytest.mark.parametrize("name", ["heldout_ce", *ACCURACY_SEEKING])
def test_the_implicit_hypergradient_is_the_finite_difference_through_training(name):
    h = 1e-4
    fd = (float(_heldout(_train(0.25 + h), name)[0]) - float(_heldout(_train(0.25 - h), name)[0])) / (2 * h)
    assert _hypergradient(0.25, name) == pytest.approx(fd, rel=1e-3, abs=1e-7)


def test_heldout_ce_points_away_from_accuracy_and_the_new_objectives_towards_it():
    assert _hypergradient(0.25, "heldout_ce") > 0  # descent lowers ε: the less accurate side
    for name in ACCURACY_SEEKING:
        assert _hypergradient(0.25, name) < 0, name  # descent raises ε: the more accurate side


def _search(name: str, start: float = 0.25, steps: int = 4, lr: float = 0.05) -> float:
    """Outer Adam on ε (its first steps move ε by about lr against the hypergradient's sign),
    each update projected back into label smoothing's range."""
    epsilon = torch.tensor([start], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([epsilon], lr=lr)
    for _ in range(steps):
        epsilon.grad = torch.tensor([_hypergradient(float(epsilon.detach()), name)], dtype=torch.float64)
        optimizer.step()
        with torch.no_grad():
            epsilon.copy_(project(FAMILY, epsilon)[0])
    return float(epsilon.detach())


@pytest.mark.parametrize("name", ACCURACY_SEEKING)
def test_a_short_search_on_heldout_ce_loses_accuracy_and_on_the_new_objectives_gains_it(name):
    start_accuracy = _heldout(_train(0.25), "heldout_ce")[1]
    on_ce, on_new = _search("heldout_ce"), _search(name)
    assert on_ce < 0.2 and on_new > 0.3
    assert _heldout(_train(on_ce), "heldout_ce")[1] < start_accuracy
    assert _heldout(_train(on_new), "heldout_ce")[1] > start_accuracy
