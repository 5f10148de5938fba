"""The registry of loss families: closed forms, gradients in logits and ω, checks, registration,
and a family of the user's own from meta-training to a DomainBed algorithm."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from domainbed_itl.losses import (PLUGINS_ENV, FixedLoss, LossFamily, LossSpec, OrderedFamily,
                                  Parameter, ParameterRangeError, TaylorLoss, family_names,
                                  get_family, load_loss, num_taylor_params, register_family,
                                  resolve_loss, save_loss, taylor_loss, zoo)
from domainbed_itl.losses import families
from domainbed_itl.losses.checks import check_minimisable

from conftest import docs_family_example

REPO = Path(__file__).resolve().parents[2]
BUILT_IN = ("composite", "focal", "gce", "label_smoothing", "poly", "sce", "taylor")


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test (families registered by the test vanish)."""
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))
    monkeypatch.delenv(PLUGINS_ENV, raising=False)


def _batch(classes=5, n=7, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, classes, dtype=dtype, generator=generator) * 2,
            torch.randint(0, classes, (n,), generator=generator))


def _p_true(logits, target):
    """ŷ_t computed as exp(z_t) / Σ exp(z_c), independently of log_softmax."""
    e = logits.exp()
    return e.gather(1, target.unsqueeze(1)).squeeze(1) / e.sum(1)


# ------------------------------------------------------------------------------ closed forms


def _poly_closed_form(logits, target, epsilons):
    p = _p_true(logits, target)
    return -p.log() + sum(e * (1 - p) ** j for j, e in enumerate(epsilons, start=1))


# Each family at a parameter vector, and its value written out by hand from the paper's formula.
CLOSED_FORMS = [
    ("poly", 1, [2.0], lambda z, t: _poly_closed_form(z, t, [2.0])),
    ("poly", 3, [0.5, -0.4, 1.5], lambda z, t: _poly_closed_form(z, t, [0.5, -0.4, 1.5])),
    ("focal", None, [1.5], lambda z, t: -(1 - _p_true(z, t)) ** 1.5 * _p_true(z, t).log()),
    ("gce", None, [0.6], lambda z, t: (1 - _p_true(z, t) ** 0.6) / 0.6),
    ("label_smoothing", None, [0.2], lambda z, t: -0.8 * _p_true(z, t).log() - 0.2 * (
        z.exp() / z.exp().sum(1, keepdim=True)).log().mean(1)),
    ("sce", None, [0.3, 2.0], lambda z, t: -0.3 * _p_true(z, t).log() + 2.0 * 4.0 * (1 - _p_true(z, t))),
]


@pytest.mark.parametrize("name, order, omega, expected", CLOSED_FORMS)
def test_families_are_their_closed_forms(name, order, omega, expected):
    family = get_family(name, order)
    logits, target = _batch()
    per_sample = family.loss(logits, target, torch.tensor(omega, dtype=torch.float64), "none")
    torch.testing.assert_close(per_sample, expected(logits, target))
    torch.testing.assert_close(family.module(omega)(logits, target, reduction="sum"), per_sample.sum())


@pytest.mark.parametrize("name, order, omega, expected", CLOSED_FORMS)
def test_gradients_in_logits_and_omega_match_finite_differences(name, order, omega, expected):
    family = get_family(name, order)
    logits, target = _batch(classes=4, n=5)
    logits.requires_grad_(True)
    w = torch.tensor(omega, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, v: family.loss(z, target, v, "none"), (logits, w))
    assert torch.autograd.gradgradcheck(lambda z, v: family.loss(z, target, v), (logits, w))


def test_poly_gradient_in_epsilon_is_the_power_of_one_minus_p():
    logits, target = _batch()
    w = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(get_family("poly", 3).loss(logits, target, w, "sum"), w)
    p = _p_true(logits, target)
    torch.testing.assert_close(g, torch.stack([((1 - p) ** j).sum() for j in (1, 2, 3)]))


@pytest.mark.parametrize("name, order", [("taylor", 4), ("sce", None), ("poly", 2), ("focal", None),
                                         ("label_smoothing", None), ("gce", None)])
def test_every_family_runs_under_vmap_and_grad(name, order):
    """The meta-learner vmaps the families over domains and differentiates them in ω."""
    family = get_family(name, order)
    logits = torch.randn(3, 6, 4)
    target = torch.randint(0, 4, (3, 6))
    omega = torch.tensor(family.default_parameters(4))

    def loss(z, t, w):
        return family.loss(z, t, w)

    batched = vmap(grad(loss, argnums=2), in_dims=(0, 0, None))(logits, target, omega)
    one_by_one = torch.stack([grad(loss, argnums=2)(logits[i], target[i], omega) for i in range(3)])
    torch.testing.assert_close(batched, one_by_one)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("name, order", [("sce", None), ("poly", 2), ("focal", None),
                                         ("label_smoothing", None), ("gce", None)])
def test_defaults_are_minimisable_losses(name, order):
    for classes in (2, 10, 345):
        check_minimisable(get_family(name, order).module(get_family(name, order).default_parameters(classes)),
                          classes)


# ------------------------------------------------------------------------- taylor and sce


def test_taylor_is_the_horner_loss_and_trains_with_the_fused_module():
    family = get_family("taylor", 4)
    logits, target = _batch()
    omega = torch.tensor(family.default_parameters(5), dtype=torch.float64)
    torch.testing.assert_close(family.loss(logits, target, omega), taylor_loss(logits, target, omega, 4))
    assert family.default_parameters(5) == [1.0, 0.0, 0, 0, 0, 0, 5.0, 0, -2.5, 5 / 3, 0, 0]
    module = family.module(omega.tolist())
    assert isinstance(module, TaylorLoss) and module.order == 4
    assert [get_family("taylor", k).num_params for k in (2, 3, 4, 5)] == [num_taylor_params(k)
                                                                           for k in (2, 3, 4, 5)]


def test_sce_defaults_are_wang_et_al():
    family = get_family("sce")
    assert family.default_parameters(10) == [0.1, 1.0] and family.param_names() == ["alpha", "beta"]
    family.check([-1.0, 2.0])  # iSCE's weights are not range-checked here (the bridge refuses < 0)


# ---------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("name, order, omega, message", [
    ("focal", None, [-0.5], r"gamma \(focusing parameter; 0 is CE\) of a focal loss must be finite "
                            r"and in \[0, inf\), got gamma=-0.5"),
    ("gce", None, [0.0], r"q .* of a gce loss must be finite and in \(0, 1\], got q=0.0"),
    ("gce", None, [1.5], r"in \(0, 1\], got q=1.5"),
    ("label_smoothing", None, [1.0], r"epsilon .* of a label_smoothing loss .* in \[0, 1\), got epsilon=1.0"),
    ("poly", 1, [-1.5], r"epsilon1 .* of a poly loss of order 1 .* in \[-1, inf\), got epsilon1=-1.5"),
    ("poly", 3, [0.0, 0.0, -0.4], r"epsilon3 .* in \[-1/3, inf\), got epsilon3=-0.4"),
    ("poly", 2, [0.0, math.inf], r"got epsilon2=inf"),
    ("taylor", 2, [1.0, 0.0, math.nan, 0.0, 1.0], r"omega2 .* must be finite, got omega2=nan"),
])
def test_out_of_range_parameters_are_named_with_what_is_expected(name, order, omega, message):
    with pytest.raises(ParameterRangeError, match=message):
        get_family(name, order).check(omega)
    with pytest.raises(ValueError, match=message):
        LossSpec(name, order, omega)


def test_interval_ends_are_in_or_out_as_written():
    get_family("poly", 1).check([-1.0])  # Leng et al.'s ε >= -1: -1 removes the linear term
    get_family("gce").check([1.0])
    get_family("label_smoothing").check([0.0])
    get_family("focal").check([0.0])


@pytest.mark.parametrize("call, message", [
    (lambda: get_family("focal").check([1.0, 2.0]),
     r"a focal loss has 1 parameter, got 2 \(expected gamma\)"),
    (lambda: get_family("focal").check(["2"]), "must be numbers, got '2'"),
    (lambda: get_family("poly"), r"the poly family needs an order in \[1, 10\]"),
    (lambda: get_family("poly", 11), r"poly order must be an integer in \[1, 10\], got 11"),
    (lambda: get_family("focal", 2), "the focal family takes no order, got order=2"),
    (lambda: get_family("neural"), f"unknown loss family 'neural'; expected one of "
                                   f"{', '.join(BUILT_IN)} .*{PLUGINS_ENV}"),
    (lambda: Parameter("x", 0.0, "[1, 0]"), r"interval '\[1, 0\]' is empty"),
    (lambda: Parameter("x", 0.0, "0 to 1"), "is not one such as"),
])
def test_bad_requests_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------- registration


def _scaled_ce(logits, target, omega):
    return omega[0] * F.cross_entropy(logits, target, reduction="none")


SCALED_CE = LossFamily("scaled_ce", (Parameter("scale", 1.0, "(0, inf)", "weight of CE"),), _scaled_ce)


def test_registration_is_idempotent_and_refuses_a_second_family_under_a_name(registry):
    assert "scaled_ce" not in family_names()
    assert register_family(SCALED_CE) is SCALED_CE
    register_family(SCALED_CE)  # the same family again: nothing happens
    register_family(LossFamily("scaled_ce", SCALED_CE.parameters, _scaled_ce))  # an equal one too
    assert get_family("scaled_ce") is SCALED_CE and family_names().count("scaled_ce") == 1
    other = LossFamily("scaled_ce", (Parameter("scale", 2.0),), _scaled_ce)
    with pytest.raises(ValueError, match="another loss family is already registered as 'scaled_ce'"):
        register_family(other)
    with pytest.raises(ValueError, match="another loss family is already registered as 'focal'"):
        register_family(LossFamily("focal", (Parameter("gamma", 2.0),), _scaled_ce))
    assert get_family("scaled_ce") is SCALED_CE


@pytest.mark.parametrize("family, message", [
    (LossFamily("ce2", SCALED_CE.parameters, _scaled_ce), "not starting or ending with a digit"),
    (LossFamily("my-loss", SCALED_CE.parameters, _scaled_ce), "expected letters, digits and '_'"),
    (LossFamily("x", SCALED_CE.parameters, _scaled_ce, order=2), "register families with orders as an "
                                                                 "OrderedFamily"),
])
def test_bad_registrations_are_refused(registry, family, message):
    with pytest.raises(ValueError, match=message):
        register_family(family)


def test_a_family_needs_named_parameters():
    with pytest.raises(ValueError, match="at least one parameter, each with its own name"):
        LossFamily("x", (Parameter("a", 0.0), Parameter("a", 1.0)), _scaled_ce)


def _scaled_ce_of_order(order):
    weights = tuple(Parameter(f"w{k}", 1.0 if k == 1 else 0.0) for k in range(1, order + 1))
    return LossFamily("power_ce", weights, _power_ce, order)


def _power_ce(logits, target, omega):
    ce = F.cross_entropy(logits, target, reduction="none")
    return sum(omega[k] * ce ** (k + 1) for k in range(omega.numel()))


def test_ordered_families_are_spelled_with_their_order(registry):
    register_family(OrderedFamily("power_ce", range(1, 4), _scaled_ce_of_order))
    assert families.family_orders("power_ce") == range(1, 4) and families.family_orders("sce") is None
    assert {"power_ce1", "power_ce3", "taylor4", "poly10", "sce"} <= set(families.family_spellings())
    assert families.split_spelling("power_ce2") == ("power_ce", 2)
    assert families.split_spelling("taylor4") == ("taylor", 4)
    assert families.split_spelling("sce") == ("sce", None)
    assert families.split_spelling("focal2") == ("focal2", None)  # focal has no orders
    assert get_family("power_ce", 2) is get_family("power_ce", 2)
    assert get_family("power_ce", 2).num_params == 2


def test_fixed_loss_keeps_omega_out_of_the_state_dict_and_follows_the_logits_dtype():
    loss = get_family("poly", 2).module([2.0, 0.5])
    assert isinstance(loss, FixedLoss) and loss.state_dict() == {}
    assert "poly loss of order 2: epsilon1=2, epsilon2=0.5" in repr(loss)
    logits, target = _batch(dtype=torch.float32)
    assert loss(logits, target).dtype == torch.float32
    torch.testing.assert_close(loss(logits, target), zoo.poly(logits, target, [2.0, 0.5]))


# ----------------------------------------------------------- meta-learning inside a family


def _meta_data():
    from domainbed_itl.meta.data import synthetic_domains

    return synthetic_domains(3, 40, 12, 3, seed=0, noise=1.5, degrees_per_domain=20)


def _trainer(name, order=None, **kw):
    from domainbed_itl.meta.config import MetaConfig
    from domainbed_itl.meta.trainer import MetaTrainer

    data = _meta_data()
    config = MetaConfig(family=name, order=order, inner_steps=6, hidden=(8,), hvp_batch=32,
                        eval_size=None, batch_size=16, **kw)
    return MetaTrainer(data.domains, data.num_classes, config)


PINNED = LossFamily("pinned_ce", (Parameter("scale", 1.0, "[1, 1]", "CE weight, pinned at 1"),), _scaled_ce)


@pytest.mark.usefixtures("one_thread")
def test_an_update_that_leaves_the_familys_range_is_projected_back_and_recorded(registry):
    register_family(PINNED)  # its only admissible ω is 1: any step leaves the interval
    trainer = _trainer("pinned_ce", outer_lr=1.0, aggregate="mean")
    record = trainer.outer_step()
    assert record["hypergradient_norm"] > 0  # the update did leave [1, 1]
    assert trainer.steps_done == 1 and trainer.omega.tolist() == [1.0]
    assert record["projected"] == ["scale"] and record["omega"] == [1.0]
    assert record["omega_evaluated"] == [1.0]


@pytest.mark.usefixtures("one_thread")
def test_a_search_candidate_outside_the_range_fails_as_a_candidate():
    from domainbed_itl.meta.cmaes import CandidateFailure

    trainer = _trainer("poly", 2)
    with pytest.raises(CandidateFailure, match="outside the family's range: epsilon2 .* got epsilon2=-0.75"):
        trainer.heldout_objective([0.0, -0.75], 1)
    assert math.isfinite(trainer.heldout_objective([0.0, -0.5], 1)["outer_heldout_loss"])


# --------------------------------------------------------------- a family of the user's own


def test_any_registered_family_round_trips_through_a_loss_file(registry, tmp_path):
    register_family(SCALED_CE)
    for name, order, omega in [("scaled_ce", None, [0.5]), ("poly", 2, [2.0, -0.25]),
                               ("focal", None, [1.0]), ("gce", None, [0.5]),
                               ("label_smoothing", None, [0.05]), ("sce", None, [0.1, 1.0])]:
        path = save_loss(tmp_path / f"{name}.json", LossSpec(name, order, omega, {"note": name}))
        data = json.loads(path.read_text())
        assert (data["family"], data["order"], data["parameters"]) == (name, order, omega)
        loaded = resolve_loss(str(path))
        assert (loaded.family, loaded.order, loaded.parameters) == (name, order, omega)
        logits, target = _batch()
        torch.testing.assert_close(loaded.module()(logits, target),
                                   get_family(name, order).loss(logits, target, torch.tensor(omega)))


def test_a_loss_file_names_the_out_of_range_parameter(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "domainbed-itl-loss", "version": 1, "family": "gce",
                                "order": None, "parameters": [2.0]}))
    with pytest.raises(ValueError, match=rf"loss file {path}: q .* of a gce loss .* got q=2.0"):
        load_loss(path)


META_TINY = ["--dataset", "synthetic", "--per_domain_cap", "40", "--inner_steps", "6", "--hidden", "8",
             "--hvp_batch", "32", "--batch_size", "16", "--outer_steps", "2", "--no_progress"]


@pytest.mark.usefixtures("one_thread")
def test_a_users_family_is_meta_trained_saved_and_trained_with_in_domainbed(registry, bridge, tmp_path):
    """Registered in this process: meta_train's command line searches it, the loss file keeps
    it, and the ITL algorithm trains with it as its itl_loss."""
    from domainbed_itl.bridge.algorithms import LossHparamError
    from domainbed_itl.scripts import meta_train

    register_family(SCALED_CE)
    out = tmp_path / "meta"
    # The mean, not PCGrad: with one parameter PCGrad cancels every conflicting pair to zero,
    # and ω would move by rounding only.
    assert meta_train.main(META_TINY + ["--family", "scaled_ce", "--outer_lr", "0.5",
                                        "--aggregate", "mean", "--output_dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    spec = load_loss(out / "loss.json")
    assert (spec.family, spec.order) == ("scaled_ce", None)
    assert spec.parameters == records[-1]["omega"] and spec.parameters != [1.0]  # it moved
    hparams = {**bridge.hparams_registry.default_hparams("ITL", "Debug28"),
               "itl_loss": str(out / "loss.json")}
    algorithm = bridge.algorithms.get_algorithm_class("ITL")((3, 28, 28), 2, 2, hparams)
    assert isinstance(algorithm.supervised_loss, FixedLoss)
    assert algorithm.supervised_loss.omega.tolist() == spec.parameters
    generator = torch.Generator().manual_seed(0)
    minibatches = [(torch.randn(8, 3, 28, 28, generator=generator),
                    torch.randint(0, 2, (8,), generator=generator)) for _ in range(2)]
    x, y = torch.cat([b[0] for b in minibatches]), torch.cat([b[1] for b in minibatches])
    with torch.no_grad():
        expected = spec.parameters[0] * F.cross_entropy(algorithm.predict(x), y)
    assert algorithm.update(minibatches)["loss"] == pytest.approx(expected.item(), rel=1e-5)
    # A family unknown to the process cannot be trained with, and the message says how to fix it.
    families._REGISTRY.pop("scaled_ce")
    with pytest.raises(LossHparamError, match=f"unknown loss family 'scaled_ce'.*{PLUGINS_ENV}"):
        bridge.algorithms.get_algorithm_class("ITL")((3, 28, 28), 2, 2, hparams)



# What a DomainBed job does with --hparams '{"itl_loss": ...}': build ITL, train one step.
JOB = '''
import sys, torch
import domainbed_itl
from domainbed import algorithms, hparams_registry
domainbed_itl.register()
hparams = {**hparams_registry.default_hparams("ITL", "Debug28"), "itl_loss": sys.argv[1]}
algorithm = algorithms.get_algorithm_class("ITL")((3, 28, 28), 2, 2, hparams)
batch = [(torch.randn(8, 3, 28, 28), torch.randint(0, 2, (8,))) for _ in range(2)]
print(type(algorithm.supervised_loss).__name__, algorithm.supervised_loss.omega.tolist(),
      algorithm.update(batch)["loss"] > 0)
'''


def test_other_processes_see_a_users_family_through_the_environment_variable(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_losses.py").write_text(docs_family_example())
    loss = tmp_path / "loss.json"
    loss.write_text(json.dumps({"format": "domainbed-itl-loss", "version": 1, "family": "scaled_ce",
                                "order": None, "parameters": [0.5]}))
    standin = REPO / "tests" / "domainbed_standin"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(standin), str(tmp_path / "plugins")])}
    env.pop(PLUGINS_ENV, None)
    without = subprocess.run([sys.executable, "-c", JOB, str(loss)], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
    assert without.returncode != 0
    assert "unknown loss family 'scaled_ce'" in without.stderr and PLUGINS_ENV in without.stderr
    with_plugin = subprocess.run([sys.executable, "-c", JOB, str(loss)], capture_output=True, text=True,
                                 env={**env, PLUGINS_ENV: "my_losses"}, cwd=tmp_path, timeout=300)
    assert with_plugin.returncode == 0, with_plugin.stderr
    assert with_plugin.stdout.split() == ["FixedLoss", "[0.5]", "True"]
    broken = subprocess.run([sys.executable, "-c", JOB, str(loss)], capture_output=True, text=True,
                            env={**env, PLUGINS_ENV: "my_losses, no_such_module"}, cwd=tmp_path, timeout=300)
    assert broken.returncode != 0
    assert f"{PLUGINS_ENV} names the module 'no_such_module', which cannot be imported" in broken.stderr
