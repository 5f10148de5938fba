"""The meta-learner (Algorithm 1): trainer, run directory, command line, DomainBed data, plots."""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from domainbed_itl.bridge.domainbed_env import DomainBedNotFound
from domainbed_itl.losses import LossSpec, get_family, load_loss, save_loss
from domainbed_itl.files import runfolder
from domainbed_itl.files.runfolder import RunDirError, load_checkpoint
from domainbed_itl.meta.data import synthetic_dataset, synthetic_domains
from domainbed_itl.meta.runner import META_RUN, data_fingerprint, run_meta_training
from domainbed_itl.meta.config import MetaConfig, preset_config
from domainbed_itl.meta.draws import step_generator
from domainbed_itl.meta.trainer import MetaTrainer, NonFiniteError, mlp
from domainbed_itl.scripts._search import new_settings
from domainbed_itl.scripts import meta_train, plot_meta

REPO = Path(__file__).resolve().parents[1]
TINY = dict(inner_steps=8, hidden=(8,), hvp_batch=32, eval_size=None, batch_size=16)
TIMING = ("time_inner_s", "time_hypergradient_s", "time_eval_s", "time_diagnostics_s", "time_step_s")


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(num_domains=4, per_domain=48, features=12, classes=3, seed=0):
    return synthetic_domains(num_domains, per_domain, features, classes, seed=seed, noise=1.5,
                             degrees_per_domain=20)


def _config(**kw):
    return MetaConfig(**{**TINY, **kw})


def _checkpoint(path):
    return load_checkpoint(path, META_RUN)


def _untimed(record):
    return {k: v for k, v in record.items() if k not in TIMING}


# ---------------------------------------------------------------------------------- trainer


@pytest.mark.parametrize("kwargs,message", [
    (dict(family="neural"), "unknown loss family 'neural'"),
    (dict(order=7), r"order must be an integer in \[2, 5\], got 7"),
    (dict(family="sce", order=4), "sce family takes no order"),
    (dict(outer_steps=0), "outer_steps must be a positive integer, got 0"),
    (dict(inner_steps=-3), "inner_steps must be a positive integer, got -3"),
    (dict(outer_lr=0.0), "outer_lr must be a positive number"),
    (dict(inner_lr=float("nan")), "inner_lr must be a positive number.*got nan"),
    (dict(hidden=()), "hidden must list at least one width"),
    (dict(hidden=(8, 0)), "every hidden width must be a positive integer, got 0"),
    (dict(solver="lu"), "unknown solver 'lu'; expected one of neumann, cg"),
    (dict(aggregate="sum"), "unknown aggregation 'sum'; expected one of pcgrad, mean"),
    (dict(outer_optimizer="rmsprop"), "unknown outer optimizer 'rmsprop'"),
    (dict(inner_optimizer="lbfgs"), "unknown inner optimizer 'lbfgs'"),
    (dict(neumann_form="paper"), "unknown neumann_form 'paper'; expected one of inverse, algorithm2"),
    (dict(aggregate_reduction="max"), "unknown aggregate_reduction 'max'; expected one of mean, sum"),
    (dict(inner_momentum=1.0), r"inner_momentum must be a number in \[0, 1\), got 1.0"),
    (dict(warm_start="yes"), "warm_start must be true or false, got 'yes'"),
    (dict(max_solver_residual=0.0), "max_solver_residual must be a positive number"),
    (dict(reference_every=-1), "reference_every must be an integer >= 0, got -1"),
    (dict(inner_schedule="step"), "unknown inner_schedule 'step'; expected one of constant, "
                                  "cosine, linear"),
    (dict(inner_weight_decay=-1e-3), "inner_weight_decay must be a number >= 0.*got -0.001"),
    (dict(inner_stop_ratio=1.5), r"inner_stop_ratio must be None \(no stopping rule\) or a number "
                                 r"in \(0, 1\).*got 1.5"),
    (dict(inner_stop_every=0), "inner_stop_every must be a positive integer, got 0"),
    (dict(neumann_power_iters=-1), "neumann_power_iters must be an integer >= 0, got -1"),
    (dict(neumann_early_stop="yes"), "neumann_early_stop must be true or false, got 'yes'"),
    (dict(solver_damping=-0.1), "solver_damping must be a number >= 0.*got -0.1"),
    (dict(spectrum_iters=-2), "spectrum_iters must be an integer >= 0, got -2"),
    (dict(solver="cg", neumann_power_iters=5), "neumann_power_iters 5 applies to the Neumann "
                                               "solver only; expected solver 'neumann', got 'cg'"),
    (dict(solver="cg", neumann_early_stop=True), "neumann_early_stop True applies to the Neumann"),
    (dict(neumann_power_iters=5, neumann_form="algorithm2", neumann_alpha=1.0),
     "neumann_power_iters 5 makes α differ per domain, which needs neumann_form 'inverse'.*got "
     "'algorithm2'"),
    (dict(neumann_power_iters=5, neumann_alpha=2.5), "neumann_alpha is α·λ̂_max and must be below "
                                                     "2.*got 2.5"),
])
def test_config_rejects_bad_values_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)


def _spy_on_heldout(trainer):
    """A dict that each outer step of `trainer` fills with the inner networks ("thetas"), the
    step's draws and what the held-out objective returned ("out")."""
    captured = {}
    original = trainer._heldout

    def spy(thetas, draws):
        captured["thetas"], captured["draws"] = thetas, draws
        captured["out"] = original(thetas, draws)
        return captured["out"]

    trainer._heldout = spy
    return captured


def test_step_randomness_depends_only_on_seed_and_step():
    def draw(seed, step):
        return torch.randint(1000, (5,), generator=step_generator(seed, step)).tolist()

    assert draw(0, 3) == draw(0, 3)
    assert len({tuple(draw(s, k)) for s in (0, 1) for k in (1, 2, 3)}) == 6


def test_default_start_is_the_taylor_expansion_of_cross_entropy():
    data = _data()
    trainer = MetaTrainer(data.domains, data.num_classes, _config())
    expected = torch.tensor(trainer.family.default_parameters(data.num_classes))
    assert torch.equal(trainer.omega, expected)
    with pytest.raises(ValueError, match="has 12 parameters, got 3"):
        MetaTrainer(data.domains, data.num_classes, _config(), omega=[1.0, 2.0, 3.0])


@pytest.mark.parametrize("solver,rtol", [("neumann", 1e-5), ("cg", 1e-3)])
def test_batched_equals_sequential(solver, rtol):
    """Same draws, same maths: only float32 summation order differs.

    CG runs 5 iterations here: on these far-from-converged, near-singular Hessians, more float32
    CG iterations amplify rounding differences (15 iterations: several percent).
    """
    data = _data()
    runs, updates = [], []
    for batched in (False, True):
        trainer = MetaTrainer(data.domains, data.num_classes,
                              _config(solver=solver, cg_maxiter=5, batched=batched, aggregate="mean"))
        start = trainer.omega.clone()
        runs.append([trainer.outer_step() for _ in range(2)])
        updates.append(trainer.omega - start)
    assert updates[0].norm() > 0
    assert (updates[1] - updates[0]).norm() <= rtol * updates[0].norm()
    for seq, bat in zip(*runs):
        for key in ("outer_heldout_loss", "inner_loss", "inner_source_acc", "outer_heldout_acc"):
            assert bat[key] == pytest.approx(seq[key], rel=1e-4)


def test_non_finite_inner_loss_is_named():
    data = _data()
    omega = [float("nan")] + [1.0] * 11
    with pytest.raises(ValueError, match="must be finite"):
        MetaTrainer(data.domains, data.num_classes, _config(), omega=omega)
    trainer = MetaTrainer(data.domains, data.num_classes, _config())
    with torch.no_grad():
        trainer.omega[6] = 1e38  # finite, but its loss overflows float32 in the first step
    with pytest.raises(NonFiniteError, match="outer step 1: non-finite inner training loss when "
                                             r"training without domain 0 \(inner step 1\)"):
        trainer.outer_step()


def test_non_finite_hypergradient_is_named():
    data = _data()
    trainer = MetaTrainer(data.domains, data.num_classes, _config(neumann_alpha=1e30))
    with pytest.raises(NonFiniteError, match="outer step 1: non-finite hypergradient for "
                                             "held-out domain 0"):
        trainer.outer_step()


def test_non_finite_update_is_refused_and_rolled_back():
    data = _data()
    trainer = MetaTrainer(data.domains, data.num_classes, _config())
    trainer.outer_step()
    before = trainer.state_dict()
    trainer.optimizer.param_groups[0]["lr"] = float("inf")
    with pytest.raises(NonFiniteError, match=r"outer step 2: non-finite loss parameters ω"):
        trainer.outer_step()
    assert trainer.steps_done == 1
    assert torch.equal(trainer.omega, before["omega"])


def test_meta_training_lowers_the_held_out_loss():
    """End to end: after a few outer steps, the same draw (step 1) gives a lower held-out loss M."""
    data = synthetic_domains(4, 100, 20, 5, seed=0, noise=1.5, degrees_per_domain=20)
    config = MetaConfig(inner_steps=30, hidden=(16,), hvp_batch=64, outer_optimizer="adam",
                        outer_lr=0.1, batched=True)
    trainer = MetaTrainer(data.domains, data.num_classes, config)
    records = [trainer.outer_step() for _ in range(6)]
    again = MetaTrainer(data.domains, data.num_classes, config, omega=trainer.omega).outer_step()
    assert again["outer_heldout_loss"] < records[0]["outer_heldout_loss"] - 0.05
    assert again["outer_heldout_acc"] > records[0]["outer_heldout_acc"]


def test_diagnostics_are_what_they_say():
    """The recorded inner gradient norm is ‖∂L_ω/∂θ‖ on the source data at the returned θ, the
    residual ‖H u + v‖/‖v‖ of the Neumann solve u ≈ −H⁻¹v against the dense Hessian of the
    same batch, and the reference compares with a long MINRES solve every K steps."""
    from torch.func import hessian

    data = _data()
    config = _config(reference_every=2)
    trainer = MetaTrainer(data.domains, data.num_classes, config)
    omega = trainer.omega.clone()
    captured = _spy_on_heldout(trainer)
    first = trainer.outer_step()
    thetas, draws, vs = captured["thetas"], captured["draws"], captured["out"][0]
    for i, idx in enumerate(draws.source_eval):
        theta = thetas[i].clone().requires_grad_()
        loss = trainer.family.loss(trainer.apply(theta, trainer.x[idx]), trainer.y[idx], omega)
        (g,) = torch.autograd.grad(loss, theta)
        assert first["per_domain"]["inner_grad_norm"][i] == pytest.approx(float(g.norm()), rel=1e-4)
        hvp_idx = draws.hvp[i]
        x_h, y_h = trainer.x[hvp_idx], trainer.y[hvp_idx]
        h = hessian(lambda t, x_h=x_h, y_h=y_h: trainer.family.loss(trainer.apply(t, x_h), y_h, omega)
                    )(thetas[i]).double()
        alpha, eye = config.neumann_alpha, torch.eye(h.shape[0], dtype=torch.float64)
        step = eye - alpha * h
        u, term = torch.zeros_like(vs[i], dtype=torch.float64), -vs[i].double()
        for _ in range(config.neumann_steps + 1):
            u, term = u + alpha * term, step @ term
        expected = (h @ u + vs[i].double()).norm() / vs[i].double().norm()
        assert first["per_domain"]["solver_residual"][i] == pytest.approx(float(expected), rel=1e-3)
    assert 0 < first["inner_grad_norm_ratio"] < 1  # training reduced the gradient
    assert "reference" not in first
    second = trainer.outer_step()
    ref = second["reference"]
    assert ref["domain"] == 0 and -1 <= ref["cosine"] <= 1 and ref["reference_maxiter"] == 200
    assert ref["reference_residual"] < second["per_domain"]["solver_residual"][0]


def test_residual_of_a_diverging_neumann_series_exceeds_one_and_can_be_left_out():
    data = _data()
    diverging = _config(neumann_alpha=50.0, neumann_steps=10)
    record = MetaTrainer(data.domains, data.num_classes, diverging).outer_step()
    assert min(record["per_domain"]["solver_residual"]) > 1
    guarded = MetaTrainer(data.domains, data.num_classes,
                          dataclasses.replace(diverging, max_solver_residual=1.0))
    start = guarded.omega.clone()
    record = guarded.outer_step()
    assert record["trusted_domains"] == 0 and record["hypergradient_norm"] == 0
    assert torch.equal(guarded.omega, start) and guarded.steps_done == 1
    mixed = MetaTrainer(data.domains, data.num_classes, _config(max_solver_residual=1.0))
    record = mixed.outer_step()
    residuals = record["per_domain"]["solver_residual"]
    assert record["trusted_domains"] == sum(r <= 1.0 for r in residuals) > 0


def test_a_run_says_when_a_step_trusted_no_domain(tmp_path, capsys):
    data = _data()
    config = _config(neumann_alpha=50.0, neumann_steps=10, max_solver_residual=1.0, outer_steps=1)
    run_meta_training(data, config, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "outer step 1: no domain's solve left a relative residual within max_solver_residual 1.0" in err
    assert "ω unchanged" in err


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_warm_start_continues_the_networks_and_resumes_bit_for_bit(tmp_path, optimizer):
    data = _data()
    config = _config(warm_start=True, inner_optimizer=optimizer,
                     inner_lr=0.01 if optimizer == "adam" else 0.05, outer_steps=4)
    full = run_meta_training(data, config, tmp_path / "full", progress=False)
    run_meta_training(data, dataclasses.replace(config, outer_steps=2), tmp_path / "cut",
                      progress=False)
    ckpt = _checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["trainer"]["inner"]["optimizer"]["step"] == 2 * config.inner_steps
    resumed = run_meta_training(data, config, tmp_path / "cut", resume=True, progress=False)
    assert torch.equal(resumed.omega, full.omega)
    for (name, a), b in zip(full.state_dict()["inner"]["params"].items(),
                            resumed.state_dict()["inner"]["params"].values()):
        assert torch.equal(a, b), name
    records = [[_untimed(json.loads(line)) for line in (tmp_path / d / "metrics.jsonl").read_text()
                .splitlines()] for d in ("full", "cut")]
    assert records[0] == records[1]
    # The networks carried over train on: the starting gradient of step 2 is the end of step 1's.
    assert records[0][1]["per_domain"]["inner_grad_norm_start"] == pytest.approx(
        records[0][0]["per_domain"]["inner_grad_norm"], rel=1e-3)


def test_warm_starts_with_the_stopping_rule_carry_the_networks_and_resume_bit_for_bit(tmp_path):
    data = _data()
    config = MetaConfig(**{**STATIONARY, "warm_start": True, "inner_optimizer": "adam",
                           "inner_lr": 0.01, "outer_steps": 3, "spectrum_iters": 0})
    full = run_meta_training(data, config, tmp_path / "full", progress=False)
    run_meta_training(data, dataclasses.replace(config, outer_steps=1), tmp_path / "cut",
                      progress=False)
    resumed = run_meta_training(data, config, tmp_path / "cut", resume=True, progress=False)
    assert torch.equal(resumed.omega, full.omega)
    records = [[_untimed(json.loads(line)) for line in (tmp_path / d / "metrics.jsonl").read_text()
                .splitlines()] for d in ("full", "cut")]
    assert records[0] == records[1]
    steps = [r["per_domain"]["inner_steps_used"] for r in records[0]]
    ckpt = _checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert ckpt["trainer"]["inner"]["optimizer"]["step"] == sum(max(s) for s in steps)
    assert records[0][1]["per_domain"]["inner_grad_norm_start"] == pytest.approx(
        records[0][0]["per_domain"]["inner_grad_norm"], rel=1e-3)


def test_heldout_objective_is_the_outer_steps_objective():
    data = _data()
    trainer = MetaTrainer(data.domains, data.num_classes, _config())
    objective = trainer.heldout_objective(trainer.omega.clone(), step=1)
    record = trainer.outer_step()
    for key in ("outer_heldout_loss", "outer_heldout_acc", "inner_source_acc", "inner_loss"):
        assert objective[key] == pytest.approx(record[key], rel=1e-6)
    assert trainer.heldout_objective(trainer.omega, step=1)["outer_heldout_loss"] != pytest.approx(
        objective["outer_heldout_loss"], rel=1e-6)


def test_paper_preset_is_the_papers_protocol_read_literally():
    from domainbed_itl.meta.config import GUESSES, META_PRESETS, preset_config

    config = preset_config("paper")
    assert (config.outer_lr, config.inner_lr, config.batch_size, config.neumann_steps,
            config.outer_steps) == (0.01, 0.01, 32, 15, 200)
    assert (config.outer_optimizer, config.inner_optimizer) == ("sgd", "sgd")
    assert (config.neumann_form, config.aggregate, config.aggregate_reduction) == (
        "algorithm2", "pcgrad", "sum")
    assert {"neumann_alpha", "inner_steps", "init"} <= set(GUESSES["paper"])
    assert preset_config("paper", {"outer_steps": 3}).outer_steps == 3
    with pytest.raises(ValueError, match="unknown preset 'fast'; expected one of " + ", ".join(META_PRESETS)):
        preset_config("fast")
    with pytest.raises(ValueError, match="unknown meta-training setting"):
        preset_config("paper", {"outer_step": 3})


def test_the_guarded_preset_is_the_paper_preset_with_a_residual_guard_and_the_default():
    from domainbed_itl.meta.config import preset_config
    from domainbed_itl.scripts.meta_train import DEFAULT_PRESET, build_parser

    paper, guarded = preset_config("paper").flat(), preset_config("paper_guarded").flat()
    assert {k for k in paper if paper[k] != guarded[k]} == {"max_solver_residual"}
    assert (paper["max_solver_residual"], guarded["max_solver_residual"]) == (None, 1.0)
    assert DEFAULT_PRESET == "paper_guarded" == build_parser().get_default("preset")


STATIONARY = dict(inner_steps=300, inner_lr=0.3, inner_schedule="cosine", inner_weight_decay=1e-2,
                  inner_stop_ratio=0.2, inner_stop_every=20, neumann_steps=30, neumann_alpha=1.0,
                  neumann_power_iters=15, neumann_early_stop=True, solver_damping=1e-2,
                  spectrum_iters=15, hidden=(8,), hvp_batch=32, eval_size=None, batch_size=16)


def test_with_the_new_settings_at_their_defaults_a_step_is_the_functions_of_before():
    """The paper preset leaves every new inner and solver setting at its default, and its outer
    step is then, bit for bit, the step assembled from the functions that were there before:
    inner.train with its original arguments, implicit_grad with the original Neumann partial
    sum (Algorithm 2 as printed), PCGrad summed, and plain SGD on ω."""
    from torch.func import grad

    from domainbed_itl.meta import aggregators, inner, solvers
    from domainbed_itl.meta.config import META_PRESETS, preset_config
    from domainbed_itl.meta.hypergradient import implicit_grad

    new = ("inner_schedule", "inner_weight_decay", "inner_stop_ratio", "inner_stop_every",
           "neumann_power_iters", "neumann_early_stop", "solver_damping", "spectrum_iters")
    assert not set(new) & (set(META_PRESETS["paper"]) | set(META_PRESETS["paper_guarded"]))
    data = _data()
    config = preset_config("paper", {**TINY, "batched": False})
    trainer = MetaTrainer(data.domains, data.num_classes, config)
    omega, draws, x, y = trainer.omega.clone(), trainer._draw(1), trainer.x, trainer.y
    params = inner.init_params(mlp(x.shape[1], config.hidden, data.num_classes), draws.init_seeds,
                               trainer.device)
    optimizer = inner.InnerOptimizer("sgd", config.inner_lr)
    inner.train(params, trainer.family.module(omega.tolist()), optimizer,
                optimizer.init_state(params), x, y, draws.batches, batched=False)
    thetas = inner.flat(params)
    solve = functools.partial(solvers.neumann, steps=config.neumann_steps, alpha=config.neumann_alpha)
    scale = config.hypergradient.hypergradient_scale  # Algorithm 2 as printed: 1/α
    hypergradients = []
    for i in range(trainer.num_domains):
        held, hvp = draws.heldout[i], draws.hvp[i]
        v = grad(lambda t, held=held: F.cross_entropy(trainer.apply(t, x[held]), y[held]))(thetas[i])

        def inner_grad(t, o, hvp=hvp):
            return grad(lambda u: trainer.family.loss(trainer.apply(u, x[hvp]), y[hvp], o))(t)

        hypergradients.append(scale * implicit_grad(inner_grad, thetas[i], omega, v, solve))
    h = aggregators.pcgrad(torch.stack(hypergradients), draws.surgery, reduction="sum")
    record = trainer.outer_step()
    assert torch.equal(trainer.omega, omega.add(h, alpha=-config.outer_lr))
    assert record["inner_steps_used"] == config.inner_steps and "hessian_lambda_max" not in record


def test_the_stationary_preset_documents_its_values_and_uses_every_new_setting():
    from domainbed_itl.meta.config import GUESSES, META_PRESETS, preset_config

    config, paper = preset_config("stationary"), preset_config("paper_guarded")
    changed = {k for k, v in config.flat().items() if paper.flat()[k] != v}
    assert {"inner_schedule", "inner_weight_decay", "inner_stop_ratio", "neumann_power_iters",
            "neumann_early_stop", "solver_damping"} <= changed
    assert changed <= set(GUESSES["stationary"]), "every value the preset changes has a reason"
    assert config.inner_stop_ratio < 1 and config.inner_weight_decay > 0 and config.solver_damping > 0
    assert set(META_PRESETS) >= {"paper", "paper_guarded", "stationary"}


def test_weight_decay_is_in_the_objective_the_implicit_gradient_differentiates():
    """With λ/2‖θ‖² in the inner objective, the hypergradient of a dense solve is the exact
    −(∂²L/∂θ∂ω)ᵀ(H + λI)⁻¹v of that objective (H + λI its Hessian), not the one without λ."""
    from torch.func import hessian, jacrev

    from domainbed_itl.meta import solvers

    data = _data()
    decay = 0.05
    trainer = MetaTrainer(data.domains, data.num_classes, _config(inner_weight_decay=decay),
                          solve=solvers.dense)
    captured = _spy_on_heldout(trainer)
    omega = trainer.omega.clone()
    trainer.outer_step()
    theta, v = captured["thetas"][0].double(), captured["out"][0][0].double()
    idx = captured["draws"].hvp[0]
    x, y = trainer.x[idx].double(), trainer.y[idx]

    def objective(t, o, decay=decay):  # in float64: the parameters set the dtype
        return trainer.family.loss(trainer.apply(t, x), y, o) + 0.5 * decay * t.pow(2).sum()

    def exact(decay):
        h = hessian(objective)(theta, omega.double(), decay)
        mixed = jacrev(torch.func.grad(objective), argnums=1)(theta, omega.double(), decay)
        return -torch.linalg.solve(h, v) @ mixed

    got = trainer._hypergradient(captured["thetas"][0], captured["out"][0][0], trainer.x[idx],
                                 trainer.y[idx], omega)["h"].double()
    torch.testing.assert_close(got, exact(decay), rtol=2e-3, atol=1e-6)
    assert (exact(decay) - exact(0.0)).norm() > 10 * (got - exact(decay)).norm()
    g = trainer._inner_grad(captured["thetas"][0], omega, trainer.x[idx], trainer.y[idx])
    plain = torch.func.grad(lambda t: trainer.family.loss(trainer.apply(t, trainer.x[idx]),
                                                          trainer.y[idx], omega))(captured["thetas"][0])
    torch.testing.assert_close(g, plain + decay * captured["thetas"][0])


def test_a_stationary_run_records_how_close_each_network_came_and_the_spectrum():
    """Stopped networks are at or below the ratio on the step's source-evaluation examples; the
    recorded λ_max and λ_min are those of the dense Hessian (H + λI) of the same batch; the
    gap is source minus held-out accuracy."""
    from torch.func import hessian

    data = _data()
    config = MetaConfig(**{**STATIONARY, "spectrum_iters": 200})
    trainer = MetaTrainer(data.domains, data.num_classes, config)
    captured = _spy_on_heldout(trainer)
    omega = trainer.omega.clone()
    record = trainer.outer_step()
    d = record["per_domain"]
    assert any(u < config.inner_steps for u in d["inner_steps_used"])
    for used, ratio in zip(d["inner_steps_used"], d["stationarity"]):
        assert used % config.inner_stop_every == 0 or used == config.inner_steps
        if used < config.inner_steps:
            assert ratio <= config.inner_stop_ratio * (1 + 1e-4)
    assert d["stationarity"] == pytest.approx([e / s for e, s in zip(d["inner_grad_norm"],
                                                                     d["inner_grad_norm_start"])])
    assert record["inner_steps_used"] == pytest.approx(sum(d["inner_steps_used"]) / 4)
    assert d["source_heldout_gap"] == pytest.approx(
        [s - h for s, h in zip(d["inner_source_acc"], d["heldout_acc"])], abs=1e-6)
    for i, idx in enumerate(captured["draws"].hvp):
        def objective(t, idx=idx):
            return (trainer.family.loss(trainer.apply(t, trainer.x[idx]), trainer.y[idx], omega)
                    + 0.5 * config.inner_weight_decay * t.pow(2).sum())

        eigenvalues = torch.linalg.eigvalsh(hessian(objective)(captured["thetas"][i]).double())
        scale = float(eigenvalues.abs().max())
        assert d["hessian_lambda_max"][i] == pytest.approx(float(eigenvalues[-1]), abs=2e-2 * scale)
        assert d["hessian_lambda_min"][i] == pytest.approx(float(eigenvalues[0]), abs=2e-2 * scale)


@pytest.mark.parametrize("batched", [True, False])
def test_a_stationary_run_is_the_same_batched_or_sequential_and_in_heldout_objective(batched):
    data = _data()
    runs = {}
    for mode in (True, False):
        trainer = MetaTrainer(data.domains, data.num_classes, MetaConfig(**{**STATIONARY, "batched": mode}))
        runs[mode] = (trainer.heldout_objective(trainer.omega.clone(), step=1), trainer.outer_step(),
                      trainer.omega.clone())
    (objective, record, omega), (_, seq_record, seq_omega) = runs[batched], runs[False]
    assert record["per_domain"]["inner_steps_used"] == seq_record["per_domain"]["inner_steps_used"]
    assert record["per_domain"]["inner_steps_used"] == objective["per_domain"]["inner_steps_used"]
    for key in ("outer_heldout_loss", "outer_heldout_acc", "inner_source_acc", "inner_loss",
                "source_heldout_gap"):
        assert objective[key] == pytest.approx(record[key], rel=1e-5, abs=1e-7)
        assert record[key] == pytest.approx(seq_record[key], rel=1e-4, abs=1e-7)
    assert objective["per_domain"]["stationarity"] == pytest.approx(
        record["per_domain"]["stationarity"], rel=1e-3)
    torch.testing.assert_close(omega, seq_omega, rtol=1e-4, atol=1e-6)


def test_checkpoints_written_before_a_setting_existed_resume_with_its_default(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=1), tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    flat = MetaConfig.from_dict(ckpt["config"]).flat()  # the layout before the settings tree
    ckpt["config"] = {k: v for k, v in flat.items() if k not in ("warm_start", "max_solver_residual")}
    torch.save(ckpt, path)
    assert run_meta_training(data, _config(outer_steps=2), tmp_path, resume=True,
                             progress=False).steps_done == 2
    with pytest.raises(RunDirError, match="warm_start: False in the checkpoint, True now"):
        run_meta_training(data, _config(outer_steps=3, warm_start=True), tmp_path, resume=True,
                          progress=False)


# ------------------------------------------------------------------------------ run directory


def test_run_writes_loss_metrics_and_checkpoint(tmp_path):
    data = _data()
    trainer = run_meta_training(data, _config(outer_steps=3, seed=5), tmp_path / "run",
                                progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("inner_source_acc", "outer_heldout_acc", "outer_heldout_loss", "omega",
                "time_inner_s", "time_hypergradient_s"):
        assert key in records[0]
    spec = load_loss(tmp_path / "run" / "loss.json")
    assert (spec.family, spec.order) == ("taylor", 4)
    assert spec.parameters == trainer.omega.tolist() == records[-1]["omega"]
    prov = spec.provenance
    assert (prov["meta_train_dataset"], prov["steps"], prov["seed"]) == ("synthetic", 3, 5)
    assert prov["package_version"]
    ckpt = _checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["trainer"]["steps_done"] == 3 and ckpt["metrics"] == records
    assert oct(os.stat(tmp_path / "run" / "checkpoint.pt").st_mode & 0o044) == oct(
        0o044 & ~_umask())
    assert not list((tmp_path / "run").glob(".*tmp"))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_reaches_exactly_the_uninterrupted_omega(tmp_path, optimizer):
    data = _data()
    full = run_meta_training(data, _config(outer_steps=4, outer_optimizer=optimizer),
                             tmp_path / "full", progress=False)
    run_meta_training(data, _config(outer_steps=2, outer_optimizer=optimizer), tmp_path / "cut",
                      progress=False)
    resumed = run_meta_training(data, _config(outer_steps=4, outer_optimizer=optimizer),
                                tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps_done == 4
    assert torch.equal(resumed.omega, full.omega)
    metrics = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "cut")]
    assert [_untimed(json.loads(a)) for a in metrics[0]] == [_untimed(json.loads(b)) for b in metrics[1]]
    assert load_loss(tmp_path / "cut" / "loss.json").parameters == full.omega.tolist()


def test_resume_repairs_views_written_after_the_checkpoint(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=2), tmp_path, progress=False)
    (tmp_path / "metrics.jsonl").write_text("garbage\n")
    (tmp_path / "loss.json").unlink()
    run_meta_training(data, _config(outer_steps=2), tmp_path, resume=True, progress=False)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert load_loss(tmp_path / "loss.json").provenance["steps"] == 2


def test_output_dir_is_protected(tmp_path):
    data = _data()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not empty.*notes.txt.*--resume.*--overwrite"):
        run_meta_training(data, _config(outer_steps=1), tmp_path, progress=False)
    with pytest.raises(RunDirError, match="cannot resume.*no checkpoint.pt"):
        run_meta_training(data, _config(outer_steps=1), tmp_path, resume=True, progress=False)
    with pytest.raises(RunDirError, match="exclude each other"):
        run_meta_training(data, _config(outer_steps=1), tmp_path, resume=True, overwrite=True,
                          progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    run_meta_training(data, _config(outer_steps=1), tmp_path, overwrite=True, progress=False)
    first = (tmp_path / "checkpoint.pt").read_bytes()
    run_meta_training(data, _config(outer_steps=1, seed=1), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() != first
    assert (tmp_path / "notes.txt").read_text() == "mine"
    fresh = run_meta_training(data, _config(outer_steps=1), tmp_path / "new", resume=True,
                              progress=False)
    assert fresh.steps_done == 1  # --resume where nothing ran yet starts the run


def test_resume_refuses_other_settings_or_data(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=1), tmp_path, progress=False)
    with pytest.raises(RunDirError, match="inner_lr: 0.01 in the checkpoint, 0.02 now"):
        run_meta_training(data, _config(outer_steps=2, inner_lr=0.02), tmp_path, resume=True,
                          progress=False)
    with pytest.raises(RunDirError, match="the data differ"):
        run_meta_training(_data(seed=1), _config(outer_steps=2), tmp_path, resume=True,
                          progress=False)
    spec = LossSpec("taylor", 4, [0.5] * 12)
    with pytest.raises(RunDirError, match="initial loss parameters differ"):
        run_meta_training(data, _config(outer_steps=2), tmp_path, init=spec, resume=True,
                          progress=False)


def test_non_finite_stop_keeps_the_last_good_checkpoint(tmp_path):
    data = _data()
    config = _config(outer_steps=3, outer_optimizer="adam", outer_lr=1e30)
    with pytest.raises(NonFiniteError, match=r"outer step 2: non-finite .*the last good checkpoint "
                                             r"\(.*checkpoint.pt, step 1\) is kept"):
        run_meta_training(data, config, tmp_path, progress=False)
    assert _checkpoint(tmp_path / "checkpoint.pt")["trainer"]["steps_done"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def _outputs(folder):
    return {name: (folder / name).read_bytes() for name in META_RUN.outputs}


def test_overwrite_keeps_the_previous_run_when_the_new_one_fails_first(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=2), tmp_path, progress=False)
    before, notes = _outputs(tmp_path), []
    with pytest.raises(NonFiniteError, match=r"outer step 1: .*no checkpoint had been written yet; "
                                             r"--overwrite kept the previous run \(2 outer steps, "
                                             r"checkpoint.pt, metrics.jsonl, loss.json\) in "):
        run_meta_training(data, _config(outer_steps=2, inner_lr=1e30), tmp_path, overwrite=True,
                          progress=False, log=notes.append)
    assert _outputs(tmp_path) == before
    assert not (tmp_path / runfolder.REPLACED).exists()
    assert len(notes) == 1 and "moved the previous run" in notes[0]


def test_overwrite_deletes_the_previous_run_once_the_first_checkpoint_exists(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=2), tmp_path, progress=False)
    before, seen = _outputs(tmp_path), []

    def log(message):  # called right after the move aside, and after the first new checkpoint
        seen.append((message, sorted(p.name for p in tmp_path.iterdir() if p.name in META_RUN.outputs)))
        if len(seen) == 1:
            assert _outputs(tmp_path / runfolder.REPLACED) == before

    run_meta_training(data, _config(outer_steps=2, seed=1), tmp_path, overwrite=True,
                      progress=False, log=log)
    (moved, left), (replaced, written) = seen
    assert f"moved the previous run in {tmp_path} (2 outer steps, checkpoint.pt, metrics.jsonl, " \
           f"loss.json) aside" in moved and left == []
    assert replaced == (f"--overwrite: replaced the previous run in {tmp_path} (2 outer steps, "
                        "checkpoint.pt, metrics.jsonl, loss.json)")
    assert written == sorted(META_RUN.outputs) and not (tmp_path / runfolder.REPLACED).exists()
    assert _outputs(tmp_path)["checkpoint.pt"] != before["checkpoint.pt"]


@pytest.mark.parametrize("new_checkpoint", [False, True])
def test_an_overwrite_killed_midway_is_finished_by_the_next_run(tmp_path, new_checkpoint):
    data = _data()
    run_meta_training(data, _config(outer_steps=1), tmp_path / "old", progress=False)
    run_meta_training(data, _config(outer_steps=1, seed=1), tmp_path / "new", progress=False)
    aside = tmp_path / "run" / runfolder.REPLACED  # as a killed --overwrite leaves it
    aside.mkdir(parents=True)
    for name in META_RUN.outputs:
        os.replace(tmp_path / "old" / name, aside / name)
    if new_checkpoint:
        os.replace(tmp_path / "new" / runfolder.CHECKPOINT, tmp_path / "run" / runfolder.CHECKPOINT)
    notes = []
    trainer = run_meta_training(data, _config(outer_steps=2, seed=int(new_checkpoint)),
                                tmp_path / "run", resume=True, progress=False, log=notes.append)
    assert trainer.steps_done == 2 and not aside.exists()
    assert ("deleted the run" if new_checkpoint else "moved the previous run back") in notes[0]


# ------------------------------------------------------------------------------ command line

CLI_TINY = ["--dataset", "synthetic", "--per_domain_cap", "48", "--inner_steps", "8",
            "--hidden", "8", "--hvp_batch", "32", "--outer_lr", "0.0001", "--no_progress"]


@pytest.mark.parametrize("argv,message", [
    (["--family", "taylor7"], "argument --family: invalid choice: 'taylor7'"),
    (["--family", "taylor", "--order", "7"], r"order must be an integer in \[2, 5\], got 7"),
    (["--family", "taylor"], "--family taylor needs --order"),
    (["--family", "taylor4", "--order", "5"], "--family taylor4 conflicts with --order 5"),
    (["--family", "sce", "--order", "2"], "--family sce takes no --order"),
    (["--family", "poly"], r"--family poly needs --order in \[1, 10\] \(or use --family poly1..poly10\)"),
    (["--family", "poly", "--order", "11"], r"poly order must be an integer in \[1, 10\], got 11"),
    (["--family", "focal2"], "argument --family: invalid choice: 'focal2'"),
    (["--order", "3"], "--order 3 needs a --family with orders"),
    (["--init", "ITL", "--family", "poly1"], "--init ITL holds a taylor loss of order 4, but --family asks "
                                             "for poly of order 1"),
    (["--outer_steps", "0"], "argument --outer_steps: expected a positive integer, got '0'"),
    (["--inner_steps", "-5"], "argument --inner_steps: expected a positive integer, got '-5'"),
    (["--outer_lr", "inf"], "argument --outer_lr: expected a positive finite number, got 'inf'"),
    (["--hidden", "256,x"], "expected comma-separated positive hidden widths"),
    (["--aggregate", "sum"], "argument --aggregate: invalid choice: 'sum'"),
    (["--init", "no/such/loss.json"], "neither a preset loss"),
    (["--init", "ITL", "--family", "sce"], "--init ITL holds a taylor loss of order 4"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--inner_stop_ratio", "1.5"], r"inner_stop_ratio must be None \(no stopping rule\) or a number "
                                    r"in \(0, 1\)"),
    (["--inner_weight_decay", "-1"], "argument --inner_weight_decay: expected a finite number >= 0, "
                                     "got '-1'"),
    (["--inner_schedule", "exp"], "argument --inner_schedule: invalid choice: 'exp'"),
    (["--neumann_power_iters", "5"], "neumann_power_iters 5 makes α differ per domain, which needs "
                                     "neumann_form 'inverse'"),
    (["--solver_damping", "nan"], "argument --solver_damping: expected a finite number >= 0"),
    (["--device", "meta"], "--device meta: only cpu and cuda devices are supported"),
    (["--device", "cuda:7"], "--device cuda:7: (CUDA is not available|this machine has [0-6] CUDA)"),
])
def test_cli_rejects_bad_arguments_by_name(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        meta_train.main(CLI_TINY + ["--output_dir", str(tmp_path / "out")] + argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_every_setting_has_a_flag():
    assert set(MetaConfig().flat()) - set(meta_train.CONFIG_FLAGS) == {"family", "order"}


def test_cli_runs_the_stationary_preset_and_records_convergence(tmp_path):
    argv = ["--preset", "stationary", "--dataset", "synthetic", "--per_domain_cap", "48",
            "--inner_steps", "200", "--inner_stop_every", "20", "--inner_stop_ratio", "0.3",
            "--hidden", "8", "--hvp_batch", "32", "--eval_size", "64", "--neumann_steps", "20",
            "--spectrum_iters", "5", "--outer_steps", "2", "--no_progress",
            "--output_dir", str(tmp_path)]
    assert meta_train.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    config = MetaConfig.from_dict(_checkpoint(tmp_path / "checkpoint.pt")["config"]).flat()
    assert (config["inner_schedule"], config["inner_stop_ratio"], config["neumann_power_iters"],
            config["inner_steps"]) == ("cosine", 0.3, 20, 200)
    for r in records:
        assert len(r["per_domain"]["stationarity"]) == len(r["per_domain"]["inner_steps_used"]) == 6
        assert all(u <= 200 for u in r["per_domain"]["inner_steps_used"])
        assert {"hessian_lambda_max", "hessian_lambda_min", "source_heldout_gap"} <= set(r)


@pytest.mark.parametrize("argv, family", [
    (["--family", "taylor4"], ("taylor", 4)), (["--family", "taylor", "--order", "3"], ("taylor", 3)),
    (["--family", "sce"], ("sce", None)), (["--family", "poly1"], ("poly", 1)),
    (["--family", "poly", "--order", "3"], ("poly", 3)), (["--family", "focal"], ("focal", None)),
    (["--family", "label_smoothing"], ("label_smoothing", None)), (["--family", "gce"], ("gce", None)),
    ([], ("taylor", 4)),  # the preset's
])
def test_cli_takes_every_registered_family(tmp_path, argv, family):
    args = meta_train.build_parser().parse_args(["--output_dir", str(tmp_path), *argv])
    config = new_settings(args, meta_train.CONFIG_FLAGS, "meta_train").config
    assert (config.family, config.order) == family


def test_cli_protects_output_dir_and_reports_missing_domainbed(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert meta_train.main(CLI_TINY + ["--output_dir", str(tmp_path / "used")]) == 2
    assert "is not empty" in capsys.readouterr().err
    code = meta_train.main(["--dataset", "RotatedMNIST", "--domainbed_root", str(tmp_path),
                            "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "new")])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not a DomainBed checkout" in err and "github.com/facebookresearch/DomainBed" in err
    code = meta_train.main(["--dataset", "RotatedMNIST", "--output_dir", str(tmp_path / "new")])
    assert code == 2
    assert "--dataset RotatedMNIST needs --data_dir" in capsys.readouterr().err
    with pytest.raises(DomainBedNotFound):
        from domainbed_itl.bridge.domainbed_data import load_domainbed_domains
        load_domainbed_domains("RotatedMNIST", tmp_path, domainbed_root=tmp_path)


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "domainbed_itl.scripts.meta_train", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


# The guard refuses every solve of so tiny a problem (residuals near 1): lifted, so that ω moves
# and the bitwise comparisons below compare something.
CLI_MOVING = CLI_TINY + ["--inner_steps", "30", "--max_solver_residual", "1e12"]


def _stop_part_way(args, output_dir, sig):
    """Start a run of many outer steps, send `sig` once it has recorded two, and return
    (the process's stderr, the steps its checkpoint holds)."""
    run = _cli(args + ["--outer_steps", "1000", "--output_dir", str(output_dir)])
    metrics = output_dir / "metrics.jsonl"
    deadline = time.time() + 900  # two steps take seconds, but minutes on a loaded shared machine
    while time.time() < deadline and run.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    run.send_signal(sig)
    _, err = run.communicate(timeout=300)
    assert run.returncode in (130, -signal.SIGKILL), err
    return err, _checkpoint(output_dir / "checkpoint.pt")["trainer"]["steps_done"]


def _same_as_uninterrupted(args, tmp_path, steps):
    """The resumed run in tmp_path/cut ends where a run of `steps` outer steps from the start
    ends, with ω moved away from its start."""
    full = _cli(args + ["--outer_steps", str(steps), "--output_dir", str(tmp_path / "full")])
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    final = [_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("full", "cut")]
    assert torch.equal(final[0]["trainer"]["omega"], final[1]["trainer"]["omega"])
    assert not torch.equal(final[0]["trainer"]["omega"], torch.as_tensor(final[0]["init_omega"]))
    assert (load_loss(tmp_path / "cut" / "loss.json").parameters
            == load_loss(tmp_path / "full" / "loss.json").parameters)


def test_cli_killed_run_resumes_bitwise(tmp_path):
    args = CLI_MOVING + ["--seed", "3"]
    _, steps_at_kill = _stop_part_way(args, tmp_path / "cut", signal.SIGKILL)
    assert steps_at_kill >= 2, "the run should be killed part-way"
    target = steps_at_kill + 2
    resumed = _cli(args + ["--outer_steps", str(target), "--output_dir", str(tmp_path / "cut"),
                           "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{target} outer steps" in out
    _same_as_uninterrupted(args, tmp_path, target)


def test_cli_interrupted_run_says_so_in_one_line_and_resumes_bitwise(tmp_path):
    args = CLI_MOVING + ["--seed", "4"]
    err, steps_done = _stop_part_way(args, tmp_path / "cut", signal.SIGINT)  # Ctrl-C
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"interrupted: the run in {tmp_path / 'cut'} can be "
                                            "resumed with --resume")
    target = steps_done + 2
    resumed = _cli(["--output_dir", str(tmp_path / "cut"), "--resume", "--no_progress",
                    "--outer_steps", str(target)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"{target} outer steps" in out, err
    _same_as_uninterrupted(args, tmp_path, target)


def _main(argv, capsys):
    code = meta_train.main(argv)
    return code, capsys.readouterr().err


def test_cli_resume_needs_only_the_folder_and_keeps_the_original_command(tmp_path, capsys):
    init = tmp_path / "init.json"
    start = [v * 1.1 for v in get_family("taylor", 4).default_parameters(3)]
    save_loss(init, LossSpec("taylor", 4, start))
    first = CLI_TINY + ["--init", str(init), "--outer_steps", "2", "--output_dir", str(tmp_path / "cut")]
    assert meta_train.main(first) == 0
    init.unlink()  # the checkpoint holds the initial loss
    assert meta_train.main(first + ["--resume"]) == 0  # the same command again: nothing to do
    resume = ["--output_dir", str(tmp_path / "cut"), "--resume", "--outer_steps", "3", "--no_progress"]
    assert meta_train.main(resume) == 0
    save_loss(init, LossSpec("taylor", 4, start))
    assert meta_train.main(first[:-2] + ["--outer_steps", "3", "--output_dir", str(tmp_path / "full")]) == 0
    final = [_checkpoint(tmp_path / d / "checkpoint.pt")["trainer"]["omega"] for d in ("full", "cut")]
    assert torch.equal(final[0], final[1])
    provenance = load_loss(tmp_path / "cut" / "loss.json").provenance
    assert provenance["command"] == meta_train_command(first) and provenance["steps"] == 3
    (entry,) = provenance["resumed"]
    assert entry["command"] == meta_train_command(resume) and entry["from_step"] == 2
    assert provenance["init"] == str(init) and provenance["data_flags"]["dataset"] == "synthetic"
    capsys.readouterr()
    code, err = _main(resume[:3] + ["--init", "ITL"], capsys)
    assert code == 2 and f"--init ITL contradicts the checkpoint's initial loss ({init})" in err


@pytest.mark.parametrize("flags,message", [
    (["--inner_lr", "0.02"], "--inner_lr 0.02 contradicts the checkpoint's inner_lr 0.01"),
    (["--hidden", "16"], "--hidden 16 contradicts the checkpoint's hidden 8"),
    (["--no-batched"], "--no-batched contradicts the checkpoint's batched True"),
    (["--dataset", "RotatedMNIST"], "--dataset RotatedMNIST contradicts the checkpoint's dataset synthetic"),
    (["--preset", "paper"], "--preset paper contradicts the checkpoint's preset paper_guarded"),
    (["--family", "sce"], "--family sce contradicts the checkpoint's family taylor (order 4)"),
    (["--outer_steps", "1"], "to 1 outer steps: the run has done 2 already"),
    (["--device", "meta"], "--device meta: only cpu and cuda devices are supported"),
])
def test_cli_resume_refuses_flags_that_contradict_the_checkpoint(tmp_path, capsys, flags, message):
    assert meta_train.main(CLI_TINY + ["--outer_steps", "2", "--output_dir", str(tmp_path)]) == 0
    before = {name: (tmp_path / name).read_bytes() for name in META_RUN.outputs}
    capsys.readouterr()
    code, err = _main(["--output_dir", str(tmp_path), "--resume", *flags], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert message in line
    assert {name: (tmp_path / name).read_bytes() for name in META_RUN.outputs} == before


def test_a_resume_on_another_device_type_is_refused_naming_both(tmp_path, capsys):
    data = _data()
    run_meta_training(data, _config(outer_steps=1), tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt")
    assert ckpt["device"] == "cpu"
    torch.save({**ckpt, "device": "cuda"}, tmp_path / "checkpoint.pt")  # as a GPU run leaves it
    with pytest.raises(RunDirError, match="on cpu: it was written on cuda; resume it on cuda"):
        run_meta_training(data, _config(outer_steps=2), tmp_path, resume=True, progress=False)
    if not torch.cuda.is_available():
        code, err = _main(["--output_dir", str(tmp_path), "--resume"], capsys)
        assert code == 2 and "it ran on cuda (--device cuda: CUDA is not available" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_checkpoint_loads_with_a_plain_torch_load_without_a_gpu(tmp_path):
    run_meta_training(_data(), _config(outer_steps=2, outer_optimizer="adam", warm_start=True),
                      tmp_path, device="cuda", progress=False)
    check = ("import sys, torch\n"
             "assert not torch.cuda.is_available()\n"
             "ckpt = torch.load(sys.argv[1])\n"
             "assert ckpt['device'] == 'cuda' and ckpt['trainer']['optimizer']['state']\n")
    run = subprocess.run([sys.executable, "-c", check, str(tmp_path / "checkpoint.pt")],
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _version1_run(folder, data, config, steps):
    """A run folder as domainbed-itl left it before checkpoint version 2: the version-1 layout
    (no device, provenance, unit or done), its metrics.jsonl and loss.json."""
    trainer = MetaTrainer(data.domains, data.num_classes, config)
    init_omega = trainer.omega.tolist()
    records = [trainer.outer_step() for _ in range(steps)]
    folder.mkdir()
    torch.save({"format": META_RUN.format, "version": 1, "package_version": "0.1.0",
                "config": config.flat(), "data": data_fingerprint(data), "init_omega": init_omega,
                "trainer": trainer.state_dict(), "metrics": records}, folder / "checkpoint.pt")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_loss(folder / "loss.json", LossSpec(config.family, config.order, trainer.omega.tolist(),
                                             {"command": "the first command"}))


def test_version_1_checkpoints_resume_with_the_values_of_their_time(tmp_path, capsys):
    """Version 1 recorded no device (not checked then), no provenance (the resuming command's,
    as then) and no data flags (the flags', as then)."""
    argv = CLI_TINY + ["--seed", "2"]
    config = preset_config(meta_train.DEFAULT_PRESET, {
        "inner_steps": 8, "hidden": (8,), "hvp_batch": 32, "outer_lr": 0.0001, "seed": 2})
    _version1_run(tmp_path / "old", synthetic_dataset(per_domain=48, seed=0), config, steps=2)
    assert meta_train.main(argv + ["--outer_steps", "3", "--output_dir", str(tmp_path / "full")]) == 0
    again = argv + ["--outer_steps", "3", "--output_dir", str(tmp_path / "old"), "--resume"]
    assert meta_train.main(again) == 0
    final = [_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("full", "old")]
    assert torch.equal(final[0]["trainer"]["omega"], final[1]["trainer"]["omega"])
    assert [_untimed(r) for r in final[1]["metrics"]] == [_untimed(r) for r in final[0]["metrics"]]
    provenance = load_loss(tmp_path / "old" / "loss.json").provenance
    assert provenance["command"] == meta_train_command(again) and "resumed" not in provenance
    assert final[1]["version"] == 2 and final[1]["device"] == "cpu"
    assert run_meta_training(synthetic_dataset(per_domain=48, seed=0),
                             dataclasses.replace(config, outer_steps=4), tmp_path / "old",
                             resume=True, progress=False, provenance={"command": "later"}).steps_done == 4
    provenance = load_loss(tmp_path / "old" / "loss.json").provenance
    assert provenance["command"] == meta_train_command(again)
    assert [r["command"] for r in provenance["resumed"]] == ["later"]


def meta_train_command(argv):
    return shlex.join(["python", "-m", "domainbed_itl.scripts.meta_train", *argv])


def test_cli_stops_on_non_finite_values(tmp_path):
    # --preset paper: the default's residual guard would refuse the steps before ω blows up
    proc = _cli(CLI_TINY + ["--preset", "paper", "--outer_steps", "3", "--outer_optimizer", "adam",
                            "--outer_lr", "1e30", "--output_dir", str(tmp_path)])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "error: outer step 2: non-finite inner training loss" in err
    assert "Traceback" not in err
    assert load_loss(tmp_path / "loss.json").provenance["steps"] == 1


def test_cli_refuses_a_second_writer_by_name(tmp_path):
    first = _cli(CLI_TINY + ["--outer_steps", "1000", "--output_dir", str(tmp_path)])
    holder = tmp_path / ".domainbed_itl.lock.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (tmp_path / "checkpoint.pt").exists():
        time.sleep(0.05)
    try:
        assert holder.exists(), first.communicate(timeout=5)
        for flag in ("--overwrite", "--resume"):
            second = _cli(CLI_TINY + ["--outer_steps", "2", "--output_dir", str(tmp_path), flag])
            _, err = second.communicate(timeout=300)
            assert second.returncode == 2 and "Traceback" not in err
            (line,) = err.splitlines()
            assert line.startswith(f"error: {tmp_path} is being written by another process "
                                   f"(process {first.pid} on ")
            assert f"--outer_steps 1000 --output_dir {tmp_path}" in line
            assert not (tmp_path / ".domainbed_itl.replaced").exists()
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert load_loss(tmp_path / "loss.json").provenance["steps"] >= 1


def test_cli_overwrite_that_fails_at_once_keeps_the_previous_run(tmp_path):
    done = _cli(CLI_TINY + ["--outer_steps", "2", "--output_dir", str(tmp_path)])
    assert done.wait(timeout=300) == 0
    before = (tmp_path / "loss.json").read_bytes()
    failed = _cli(CLI_TINY + ["--outer_steps", "2", "--inner_lr", "1e30", "--overwrite",
                              "--output_dir", str(tmp_path)])
    _, err = failed.communicate(timeout=300)
    assert failed.returncode == 1 and "Traceback" not in err
    assert "--overwrite kept the previous run (2 outer steps, checkpoint.pt" in err
    assert (tmp_path / "loss.json").read_bytes() == before


# ----------------------------------------------------------------------------------- plots


def test_plot_meta_writes_a_png(tmp_path):
    run_meta_training(_data(), _config(outer_steps=2), tmp_path, progress=False)
    assert plot_meta.main([str(tmp_path / "metrics.jsonl"), "--output", str(tmp_path / "c.png")]) == 0
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    assert plot_meta.main([str(tmp_path / "bad.jsonl")]) == 2


# ------------------------------------------------------------------------- DomainBed isolation


def test_meta_modules_never_import_domainbed():
    for path in (REPO / "domainbed_itl" / "meta").glob("*.py"):
        if path.name == "domainbed_data.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("domainbed") or name.startswith("domainbed_itl"), path
                assert "domainbed_env" not in name and "domainbed_data" not in name, path


@pytest.mark.domainbed
def test_domainbed_loaders_give_flat_domains(domainbed_root, mnist10k):
    from domainbed_itl.bridge.domainbed_data import load_domainbed_domains

    rotated = load_domainbed_domains("RotatedMNIST", mnist10k, domainbed_root, per_domain_cap=50)
    assert rotated.environments == ["0", "15", "30", "45", "60", "75"]
    assert [tuple(x.shape) for x, _ in rotated.domains] == [(50, 784)] * 6
    assert rotated.num_classes == 10 and rotated.domains[0][1].dtype == torch.int64
    again = load_domainbed_domains("RotatedMNIST", mnist10k, domainbed_root, per_domain_cap=50)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rotated.domains, again.domains))
    colored = load_domainbed_domains("ColoredMNIST", mnist10k, domainbed_root, per_domain_cap=40)
    assert [tuple(x.shape) for x, _ in colored.domains] == [(40, 1568)] * 3
    assert colored.num_classes == 2
    with pytest.raises(ValueError, match="unknown DomainBed dataset 'MNISTX'"):
        load_domainbed_domains("MNISTX", mnist10k, domainbed_root)


@pytest.mark.domainbed
@pytest.mark.slow
def test_cli_meta_trains_on_domainbed_rotated_mnist(tmp_path, domainbed_root, mnist10k):
    proc = _cli(["--dataset", "RotatedMNIST", "--data_dir", str(mnist10k), "--domainbed_root",
                 str(domainbed_root), "--per_domain_cap", "64", "--outer_steps", "2",
                 "--inner_steps", "10", "--hidden", "16", "--hvp_batch", "32", "--batched",
                 "--output_dir", str(tmp_path)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    spec = load_loss(tmp_path / "loss.json")
    assert (spec.family, spec.order, len(spec.parameters)) == ("taylor", 4, 12)
    assert spec.provenance["meta_train_dataset"] == "RotatedMNIST"
    assert spec.provenance["steps"] == 2
    assert spec.provenance["data"]["environments"] == ["0", "15", "30", "45", "60", "75"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert dataclasses.asdict(MetaConfig()).keys() == spec.provenance["meta_config"].keys()
