"""Everything runs with every tensor on a device that is not the CPU, and gives the CPU's results.

CI has no GPU, so the device is tests/device_standin.py's strict stand-in: tensors that report
PyTorch's `meta` device but hold real data, and an error whenever an operation mixes them with
CPU tensors (a CPU scalar excepted, as on CUDA). A CPU tensor meeting a device tensor therefore
fails here as it would on a GPU, and each run's numbers are compared with the same run on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from device_standin import (DeviceMixError, HostReadError, cpu_values, is_on_device,
                            on_device)

from domainbed_itl.analysis import hessian
from domainbed_itl.losses import TaylorLoss, get_family, zoo
from domainbed_itl.losses.families import family_names, family_orders
from domainbed_itl.meta import inner
from domainbed_itl.meta.cmaes import CMAConfig, CMASearch
from domainbed_itl.meta.config import MetaConfig
from domainbed_itl.meta.data import synthetic_domains
from domainbed_itl.meta.evaluate import Protocol, evaluate_losses
from domainbed_itl.meta.runner import run_meta_training
from domainbed_itl.meta.trainer import MetaTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(inner_steps=6, hidden=(8,), hvp_batch=24, eval_size=None, batch_size=8,
            neumann_steps=4, cg_maxiter=4)
TIMING = ("time_inner_s", "time_hypergradient_s", "time_eval_s", "time_diagnostics_s", "time_step_s")


def _data():
    return synthetic_domains(3, 32, 10, 3, seed=0, noise=1.5, degrees_per_domain=20)


def _close(a, b):
    """Equal structure and numbers (to float32 rounding) of two nested records."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _close(u, v)
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    else:
        assert a == b


# ------------------------------------------------------------------------ the stand-in device


def test_the_standin_device_refuses_cpu_tensors_as_cuda_does():
    with on_device() as device:
        a = torch.randn(3, 4).to(device)
        assert a.device == device and is_on_device(a)
        for mixed in (lambda: a + torch.ones(4), lambda: a.index_select(0, torch.tensor([0, 1])),
                      lambda: a.index_put_((torch.tensor([0]),), torch.ones(4)),
                      lambda: torch.stack([a, torch.zeros(3, 4)]), lambda: torch.ones(2, 3) @ a,
                      lambda: torch.randn(3, device=device, generator=torch.Generator())):
            with pytest.raises(DeviceMixError):
                mixed()
        with pytest.raises(TypeError, match="numpy"):
            a.numpy()
        # What CUDA allows: a CPU scalar, copies both ways, CPU indices, host reads.
        assert is_on_device(a * torch.tensor(2.0))
        assert torch.equal(cpu_values(a[torch.tensor([2, 0])]), a.cpu()[[2, 0]])
        b = torch.zeros(3, 4, device=device).copy_(torch.ones(3, 4))
        assert is_on_device(b) and not is_on_device(b.cpu()) and b.cpu().sum() == 12
        assert float(b.sum()) == 12.0 and b[0].tolist() == [1.0] * 4
        assert torch.equal(cpu_values(a @ a.T), (a.cpu() @ a.cpu().T))
    with on_device(host_reads=False) as device:
        c = torch.ones(2, device=device)
        for read in (lambda: float(c.sum()), c.tolist, lambda: bool(c.any())):
            with pytest.raises(HostReadError):
                read()


# ----------------------------------------------------------------------------- meta-training


def _outer_steps(device, **kw):
    """One outer step's record, two with warm starts (the second starts from the first's networks)."""
    trainer = MetaTrainer(_data().domains, 3, MetaConfig(**{**TINY, **kw}), device=device)
    records = [trainer.outer_step() for _ in range(2 if kw.get("warm_start") else 1)]
    assert is_on_device(trainer.omega) == (device != "cpu")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.parametrize("kw", [
    dict(batched=True, solver="neumann", reference_every=1, reference_maxiter=10, spectrum_iters=3),
    dict(batched=False, solver="cg", reference_every=1, reference_maxiter=10),
    dict(batched=True, warm_start=True, outer_optimizer="adam", inner_optimizer="adam"),
    dict(batched=False, inner_stop_ratio=0.9, inner_stop_every=2, inner_schedule="cosine",
         inner_weight_decay=1e-3, neumann_power_iters=2, neumann_early_stop=True,
         solver_damping=0.1, max_solver_residual=10.0),
], ids=["batched-neumann-reference", "sequential-cg-reference", "warm-adam",
        "stationary-guarded"])
def test_outer_steps_on_a_device_equal_the_cpu(kw):
    expected = _outer_steps("cpu", **kw)
    with on_device() as device:
        got = _outer_steps(device, **kw)
    _close(got, expected)


def test_a_warm_started_run_saved_and_resumed_on_a_device_equals_the_cpu_run(tmp_path):
    """The checkpoint of a device run (warm-started networks, Adam's and momentum's state) loads
    on a CPU-only machine and resumes on the device as if uninterrupted."""
    config = MetaConfig(**TINY, warm_start=True, outer_optimizer="adam", inner_optimizer="momentum",
                        outer_steps=3)
    run_meta_training(_data(), config, tmp_path / "cpu", progress=False)
    with on_device() as device:
        run_meta_training(_data(), dataclasses.replace(config, outer_steps=2), tmp_path / "device",
                          device=device, progress=False)
        checkpoint = torch.load(tmp_path / "device" / "checkpoint.pt", weights_only=True)
        assert checkpoint["trainer"]["inner"]["optimizer"]["momentum"]
        run_meta_training(_data(), config, tmp_path / "device", resume=True, device=device,
                          progress=False)
    cpu, on = ([{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("cpu", "device"))
    assert len(on) == 3
    _close(on, cpu)


def test_a_cmaes_generation_on_a_device_equals_the_cpu():
    def generation(device):
        trainer = MetaTrainer(_data().domains, 3, MetaConfig(**TINY), device=device)
        search = CMASearch(trainer.omega.tolist(), CMAConfig(generations=1, popsize=3, sigma0=0.1))
        record = search.generation(trainer.heldout_objective)
        return {k: v for k, v in record.items() if k != "time_step_s"}

    expected = generation("cpu")
    with on_device() as device:
        _close(generation(device), expected)


def test_evaluate_loss_meta_on_a_device_equals_the_cpu():
    protocol = Protocol(inner_steps=(3, 6), hidden=(8,), batch_size=8, eval_size=None)
    stopping = dataclasses.replace(protocol, inner_stop_ratio=0.9, inner_stop_every=2,
                                   inner_schedule="linear", batched=False)
    losses = {"CE": zoo.cross_entropy, "ITL": TaylorLoss(), "Focal": zoo.focal}
    for p in (protocol, stopping):
        expected = evaluate_losses(_data(), losses, [0], p)
        with on_device() as device:
            _close(evaluate_losses(_data(), losses, [0], p, device), expected)


def test_the_inner_loop_never_waits_for_the_device():
    """Without a stopping rule the inner training reads no value on the host (no CUDA sync)."""
    data = _data()
    x, y = torch.cat([d[0] for d in data.domains]), torch.cat([d[1] for d in data.domains])
    batches = torch.randint(len(y), (2, 5, 4), generator=torch.Generator().manual_seed(0))
    model = inner.mlp(10, (8,), 3)
    with on_device(host_reads=False) as device:
        for loss in (TaylorLoss(), zoo.cross_entropy, zoo.gce):
            for name in inner.INNER_OPTIMIZERS:
                params = inner.init_params(model, [1, 2], device)
                optimizer = inner.InnerOptimizer(name, lr=0.1)
                state = optimizer.init_state(params)
                losses = inner.train(params, loss, optimizer, state, x.to(device), y.to(device),
                                     batches.to(device), lrs=[0.1, 0.1, 0.05, 0.05, 0.01],
                                     weight_decay=1e-3)
                assert is_on_device(losses) and all(is_on_device(p) for p in params.values())


# --------------------------------------------------------------------------------- the losses


def _logits_and_target(device=None):
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(6, 4, generator=g), torch.randint(4, (6,), generator=g)
    return (logits, target) if device is None else (logits.to(device), target.to(device))


def _value_and_grad(loss, device=None):
    logits, target = _logits_and_target(device)
    logits.requires_grad_()
    value = loss(logits, target)
    (grad,) = torch.autograd.grad(value, logits)
    return value, grad


def _families():
    """Every registered family; those with orders at their lowest and highest order."""
    for name in family_names():
        orders = family_orders(name)
        for order in [None] if orders is None else [orders[0], orders[-1]]:
            yield get_family(name, order)


def _fixed_losses():
    yield "TaylorLoss", TaylorLoss()
    for name, fn in zoo.ZOO.items():
        yield f"zoo.{name}", fn
    for family in _families():
        yield f"family {family.describe()}", family.module(family.default_parameters(4))


@pytest.mark.parametrize("name,loss", list(_fixed_losses()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_loss_on_a_device_equals_the_cpu(name, loss):
    expected = _value_and_grad(loss)
    closed = inner.loss_and_grad(loss)
    expected_closed = closed(*_logits_and_target())
    with on_device() as device:
        loss = loss.to(device) if isinstance(loss, torch.nn.Module) else loss
        got = _value_and_grad(loss, device)
        got_closed = inner.loss_and_grad(loss)(*_logits_and_target(device))
        assert all(is_on_device(t) for t in (*got, *got_closed))
    for a, b in zip((*got, *got_closed), (*expected, *expected_closed)):
        torch.testing.assert_close(cpu_values(a), b)


@pytest.mark.parametrize("family", list(_families()), ids=lambda f: f.describe())
def test_every_family_loss_in_omega_on_a_device_equals_the_cpu(family):
    """The families' loss(logits, y, ω) with ω on the device, as meta-training calls it."""
    omega = torch.tensor(family.default_parameters(4))

    def run(device=None):
        logits, target = _logits_and_target(device)
        w = (omega if device is None else omega.to(device)).requires_grad_()
        value = family.loss(logits, target, w)
        return (value, *torch.autograd.grad(value, w))

    expected = run()
    with on_device() as device:
        got = run(device)
        assert all(is_on_device(t) for t in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(cpu_values(a), b)


# -------------------------------------------------------------------- our DomainBed algorithms


def _algorithm_updates(bridge, name, device=None):
    hparams = bridge.hparams_registry.default_hparams(name, "Debug28")
    torch.manual_seed(0)
    np.random.seed(0)  # DomainBed's Mixup draws from numpy's global generator
    algorithm = bridge.algorithms.get_algorithm_class(name)((3, 28, 28), 2, 2, hparams)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 28, 28, generator=g), torch.randint(2, (4,), generator=g))
               for _ in range(2)]
    if device is not None:
        algorithm.to(device)
        batches = [(x.to(device), y.to(device)) for x, y in batches]
    return [algorithm.update(batches) for _ in range(2)]


# DomainBed bases whose own update picks its device as `"cuda" if x.is_cuda else "cpu"`: only a
# real GPU runs them on a device.
CUDA_ONLY_BASES = {"RSC", "SagNet"}


def test_our_algorithms_update_on_a_device_as_on_the_cpu(bridge):
    """Every algorithm of ours whose DomainBed base the checkout (or the stand-in) has."""
    from domainbed_itl.bridge.algorithms import LOSS_ALGORITHMS

    names = [n for n, spec in LOSS_ALGORITHMS.items()
             if spec.base in bridge.algorithms.ALGORITHMS and spec.base not in CUDA_ONLY_BASES]
    assert "ITL" in names
    for name in names:
        expected = _algorithm_updates(bridge, name)
        with on_device() as device:
            got = _algorithm_updates(bridge, name, device)
        assert all(isinstance(v, float) for r in got for v in r.values()), name
        _close(got, expected)


# ------------------------------------------------------------------------------ the analyses


def test_the_hessians_lanczos_on_a_device_equals_the_cpu():
    """loss_landscape's spectrum: Lanczos, whose small tridiagonal problem is solved on the CPU
    and whose Ritz vectors return to the device. (The stand-in cannot run its Hessian-vector
    product, forward over reverse mode, which crashes PyTorch on tensor subclasses: a symmetric
    matrix on the device stands in for the Hessian.)"""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    symmetric = q @ torch.diag(torch.linspace(-1.0, 3.0, 12)) @ q.T

    def spectrum(device=None):
        a, v0 = (symmetric, torch.ones(12)) if device is None else (symmetric.to(device),
                                                                      torch.ones(12, device=device))
        pairs = hessian.lanczos(lambda v: a @ v, v0, steps=12)
        value, vector = pairs.top()
        return value, vector, hessian.residual(lambda v: a @ v, value, vector)

    expected = spectrum()
    with on_device() as device:
        got = spectrum(device)
        assert is_on_device(got[1])
    assert got[0] == pytest.approx(expected[0], rel=1e-5) and got[0] == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(cpu_values(got[1]), expected[1])
    assert got[2] == pytest.approx(expected[2], abs=1e-5)
