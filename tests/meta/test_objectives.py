"""Meta-objectives: values by hand, the temperature solve against scipy, gradients (the
envelope theorem included) against finite differences, torch.func, and the registry."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch.func import grad, grad_and_value, vmap

from domainbed_itl.meta import objectives
from domainbed_itl.meta.objectives import (LOG_BETA_RANGE, Objective, accuracy, calibrated_ce,
                                           get_objective, heldout_ce, objective_and_accuracy,
                                           objective_names, optimal_log_inverse_temperature,
                                           register_objective, soft_error)

OBJECTIVES = ("heldout_ce", "calibrated_ce", "soft_error")


def _task(n=12, classes=4, flips=3, scale=2.0, seed=0):
    """Logits and labels that agree on all but `flips` examples (an interior temperature)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, dtype=torch.float64, generator=g) * scale
    labels = logits.argmax(1)
    labels[:flips] = (labels[:flips] + 1) % classes
    return logits, labels


def _finite_difference(fn, logits, labels, h=1e-6):
    out = torch.zeros_like(logits)
    for index in range(logits.numel()):
        step = torch.zeros_like(logits).view(-1)
        step[index] = h
        step = step.view_as(logits)
        out.view(-1)[index] = (fn(logits + step, labels) - fn(logits - step, labels)) / (2 * h)
    return out


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(objectives, "_REGISTRY", dict(objectives._REGISTRY))
    monkeypatch.delenv(objectives.PLUGINS_ENV, raising=False)


def test_heldout_ce_is_cross_entropy_and_accuracy_is_the_argmax_rate():
    logits, labels = _task()
    torch.testing.assert_close(heldout_ce(logits, labels), F.cross_entropy(logits, labels))
    value, acc = objective_and_accuracy("heldout_ce", logits, labels)
    torch.testing.assert_close(value, F.cross_entropy(logits, labels))
    assert float(acc) == pytest.approx(9 / 12)
    assert float(accuracy(logits, labels)) == pytest.approx(9 / 12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_temperature_is_scipys_minimiser_of_cross_entropy(seed):
    logits, labels = _task(seed=seed)
    found = float(optimal_log_inverse_temperature(logits, labels))
    reference = minimize_scalar(lambda b: float(F.cross_entropy(logits * math.exp(b), labels)),
                                bounds=LOG_BETA_RANGE, method="bounded", options={"xatol": 1e-10}).x
    assert LOG_BETA_RANGE[0] + 0.1 < found < LOG_BETA_RANGE[1] - 0.1  # an interior optimum
    assert found == pytest.approx(reference, abs=1e-5)
    torch.testing.assert_close(calibrated_ce(logits, labels),
                               F.cross_entropy(logits * math.exp(reference), labels))
    assert float(calibrated_ce(logits, labels)) <= float(heldout_ce(logits, labels))


def test_calibrated_ce_ignores_the_logits_scale_and_ends_at_the_range():
    logits, labels = _task()
    torch.testing.assert_close(calibrated_ce(3 * logits, labels), calibrated_ce(logits, labels))
    assert float(heldout_ce(3 * logits, labels)) != pytest.approx(float(heldout_ce(logits, labels)))
    right = logits.argmax(1)  # all correct: CE falls as T -> 0, so T* is the range's end
    assert float(optimal_log_inverse_temperature(logits, right)) == pytest.approx(LOG_BETA_RANGE[1])
    wrong = logits.argmin(1)  # all wrong: the flattest softmax, T* at the other end
    assert float(optimal_log_inverse_temperature(logits, wrong)) == pytest.approx(LOG_BETA_RANGE[0])


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("labels_from", ["mixed", "all right"])
def test_gradients_match_finite_differences_through_the_temperature_solve(name, labels_from):
    """calibrated_ce's autograd gradient holds T* fixed; finite differences re-solve T* at every
    point, so they agree only if the envelope (Danskin) argument holds, interior or at an end."""
    logits, labels = _task()
    if labels_from == "all right":
        labels = logits.argmax(1)
    objective = get_objective(name)
    z = logits.clone().requires_grad_()
    objective(z, labels).backward()
    expected = _finite_difference(objective, logits, labels)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-8)


def test_the_envelope_gradient_is_not_the_gradient_at_a_fixed_other_temperature():
    logits, labels = _task()
    z = logits.clone().requires_grad_()
    calibrated_ce(z, labels).backward()
    at_one = torch.func.grad(heldout_ce)(logits, labels)
    assert not torch.allclose(z.grad, at_one, atol=1e-4)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objectives_run_under_torch_func_grad_and_vmap(name):
    objective = get_objective(name)
    logits, labels = _task()
    stacked, stacked_labels = torch.stack([logits, 0.5 * logits + 1]), torch.stack([labels, labels])
    looped = torch.stack([objective(z, y) for z, y in zip(stacked, stacked_labels)])
    torch.testing.assert_close(vmap(objective)(stacked, stacked_labels), looped)
    z = logits.clone().requires_grad_()
    objective(z, labels).backward()
    torch.testing.assert_close(grad(objective)(logits, labels), z.grad)
    torch.testing.assert_close(vmap(grad(objective))(stacked, stacked_labels),
                               torch.stack([grad(objective)(z, y) for z, y in zip(stacked, stacked_labels)]))
    _, (value, acc) = grad_and_value(lambda t: objective_and_accuracy(objective, t, labels),
                                     has_aux=True)(logits)
    torch.testing.assert_close(value, objective(logits, labels))
    assert float(acc) == pytest.approx(9 / 12)


def test_soft_error_tends_to_the_error_rate_and_ignores_scale_and_shift():
    logits, labels = _task()
    error = 1 - float(accuracy(logits, labels))
    assert float(soft_error(logits, labels, tau=1e-4)) == pytest.approx(error, abs=1e-6)
    assert abs(float(soft_error(logits, labels)) - error) > 1e-3  # smooth at the default τ
    torch.testing.assert_close(soft_error(5 * logits + 3, labels), soft_error(logits, labels))


def test_registration_is_idempotent_and_refuses_a_second_objective_under_a_name(registry):
    assert set(OBJECTIVES) <= set(objective_names())
    mine = Objective("top1_ce", lambda z, y: F.cross_entropy(z, y), "a test objective")
    assert register_objective(mine) is mine and register_objective(mine) is mine
    assert get_objective("top1_ce") is mine
    with pytest.raises(ValueError, match="another objective is already registered as 'heldout_ce'"):
        register_objective(Objective("heldout_ce", heldout_ce))
    with pytest.raises(ValueError, match="objective name '1bad'"):
        register_objective(Objective("1bad", heldout_ce))
    with pytest.raises(TypeError, match="register an Objective"):
        register_objective(heldout_ce)


def test_unknown_names_and_bad_shapes_are_refused(registry):
    with pytest.raises(ValueError, match=r"unknown objective 'acc'; expected one of calibrated_ce, "
                                         r"heldout_ce, soft_error"):
        get_objective("acc")
    with pytest.raises(ValueError, match=r"objective heldout_ce: expected logits \(n, C\) and labels"):
        get_objective("heldout_ce")(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_plugin_modules_register_their_objectives(registry, tmp_path, monkeypatch):
    (tmp_path / "my_objectives.py").write_text(
        "import torch.nn.functional as F\n"
        "from domainbed_itl.meta.objectives import Objective, register_objective\n"
        "register_objective(Objective('plugin_ce', lambda z, y: F.cross_entropy(z, y)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(objectives.PLUGINS_ENV, "my_objectives")
    assert get_objective("plugin_ce").name == "plugin_ce"
    monkeypatch.setenv(objectives.PLUGINS_ENV, "no_such_module_here")
    with pytest.raises(ValueError, match="names the module 'no_such_module_here'"):
        objective_names()
    sys.modules.pop("my_objectives", None)


def test_every_built_in_objective_is_documented():
    page = (Path(__file__).resolve().parents[2] / "docs" / "objectives.md").read_text()
    for objective in objectives.BUILT_IN:
        assert f"| `{objective.name}` |" in page, objective.name
        assert objective.rewards and objective.fn.__doc__
