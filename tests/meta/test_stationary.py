"""The stationary settings of the inner training (schedule, weight decay, stopping rule, warm
starts) and of the solve (power iterations, damping, spectrum): at their defaults a step is
unchanged, and each setting acts where the implicit gradient needs it."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import spy_on_heldout

from domainbed_itl.meta.runner import run_meta_training
from domainbed_itl.meta.config import MetaConfig
from domainbed_itl.meta.trainer import MetaTrainer, mlp

from conftest import TINY_META as TINY, meta_checkpoint as _checkpoint, \
    tiny_config as _config, tiny_data as _data, untimed as _untimed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

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


def test_the_minres_preset_is_the_stationary_one_with_an_exact_solve_on_the_training_hessian():
    from domainbed_itl.meta.config import GUESSES, preset_config

    config, stationary = preset_config("stationary_minres"), preset_config("stationary")
    changed = {k for k, v in config.flat().items() if stationary.flat()[k] != v}
    assert {"solver", "solver_damping", "hvp_all_sources"} <= changed
    assert {k for k in changed if not k.startswith("neumann_")} <= set(GUESSES["stationary_minres"])
    assert config.inner == stationary.inner and config.outer == stationary.outer
    assert not config.hypergradient.batchable and stationary.hypergradient.batchable


def test_every_source_takes_each_source_set_whole_or_evenly_spaced_at_the_smallest_size():
    from domainbed_itl.meta.draws import domain_indices, every_source

    _, sources = domain_indices([4, 4, 4])
    assert torch.equal(every_source(sources), torch.stack(sources))
    _, sources = domain_indices([3, 5, 9])
    picked = every_source(sources)
    assert picked.shape == (3, 8)
    for chosen, whole in zip(picked, sources):
        assert len(set(chosen.tolist())) == 8 and set(chosen.tolist()) <= set(whole.tolist())
        assert chosen[0] == whole[0] and chosen[-1] == whole[-1]


def test_hvp_all_sources_changes_only_the_hessians_examples():
    """The same draws but the Hessian-vector products' examples, so runs with and without
    hvp_all_sources train the same networks and pair up."""
    from domainbed_itl.meta.draws import every_source

    data = _data()
    drawn = MetaTrainer(data.domains, data.num_classes, _config())._draw(3)
    trainer = MetaTrainer(data.domains, data.num_classes, _config(hvp_all_sources=True))
    whole = trainer._draw(3)
    assert torch.equal(whole.hvp, every_source(trainer._source_index))
    for name in ("batches", "init_seeds"):
        assert torch.equal(torch.as_tensor(getattr(whole, name)), torch.as_tensor(getattr(drawn, name)))
    assert all(torch.equal(a, b) for a, b in zip(whole.heldout, drawn.heldout))
    assert not torch.equal(whole.hvp, drawn.hvp)


def test_weight_decay_is_in_the_objective_the_implicit_gradient_differentiates():
    """With λ/2‖θ‖² in the inner objective, the hypergradient of a dense solve is the exact
    −(∂²L/∂θ∂ω)ᵀ(H + λI)⁻¹v of that objective (H + λI its Hessian), not the one without λ."""
    from torch.func import hessian, jacrev

    from domainbed_itl.meta import solvers

    data = _data()
    decay = 0.05
    trainer = MetaTrainer(data.domains, data.num_classes, _config(inner_weight_decay=decay),
                          solve=solvers.dense)
    captured = spy_on_heldout(trainer)
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
    captured = spy_on_heldout(trainer)
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
