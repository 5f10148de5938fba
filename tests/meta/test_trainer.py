"""The meta-learner's outer step (Algorithm 1): settings refused by name, draws, batched against
sequential, non-finite values, diagnostics, warm starts and the presets."""

from __future__ import annotations

import ast
import dataclasses
import json

import pytest
import torch
from conftest import REPO, spy_on_heldout

from domainbed_itl.meta.data import synthetic_domains
from domainbed_itl.meta.runner import run_meta_training
from domainbed_itl.meta.config import MetaConfig
from domainbed_itl.meta.draws import step_generator
from domainbed_itl.meta.trainer import MetaTrainer, NonFiniteError

from conftest import meta_checkpoint as _checkpoint, \
    tiny_config as _config, tiny_data as _data, untimed as _untimed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

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
    (dict(solver="lu"), "unknown solver 'lu'; expected one of neumann, cg, minres"),
    (dict(minres_maxiter=0), "minres_maxiter must be a positive integer, got 0"),
    (dict(hvp_all_sources="all"), "hvp_all_sources must be true or false, got 'all'"),
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


@pytest.mark.parametrize("solver,rtol", [("neumann", 1e-5), ("cg", 1e-3), ("minres", 1e-3)])
def test_batched_equals_sequential(solver, rtol):
    """Same draws, same maths: only float32 summation order differs (MINRES, which cannot run
    under vmap, solves one domain at a time in a batched run too).

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
    captured = spy_on_heldout(trainer)
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
