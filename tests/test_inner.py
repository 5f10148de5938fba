"""The stacked inner loop against one network trained by torch.optim, and its optimisers' state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from domainbed_itl.losses import TaylorLoss, cpu_kernel, cross_entropy_taylor_init, taylor_loss_reference
from domainbed_itl.meta import inner

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _problem(n=3, steps=12, batch=5, features=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, features, generator=g, dtype=DT)
    y = torch.randint(classes, (40,), generator=g)
    batches = torch.randint(40, (n, steps, batch), generator=g)
    model = inner.mlp(features, (7, 5), classes).to(DT)
    return x, y, batches, model


def _torch_optimizer(name, params, lr):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, betas=inner.ADAM_BETAS, eps=inner.ADAM_EPS)


def _taylor_losses(backend):
    """(the fused fixed loss, the term-by-term oracle under autograd) for the same ω."""
    omega = [0.9, 0.1, 1.5, -0.4, 0.3, -0.2, 0.7, 0.2, -0.5, 0.1, 0.3, -0.1]
    return (TaylorLoss(omega, 4, backend),
            lambda z, t: taylor_loss_reference(z, t, torch.tensor(omega, dtype=z.dtype), 4))


def _losses(kind):
    """(the loss the stacked loop trains with, the loss each torch.optim network trains with)."""
    if kind == "cross_entropy":  # closed form
        return F.cross_entropy, F.cross_entropy
    if kind == "autograd":  # a plain callable: its logit gradient comes from autograd
        return (lambda z, t, reduction="mean": F.cross_entropy(z, t, reduction=reduction),
                F.cross_entropy)
    if kind == "taylor_cpp" and cpu_kernel.load() is None:
        pytest.skip(f"the C++ kernel cannot be built here: {cpu_kernel.load_error()}")
    return _taylor_losses("cpp" if kind == "taylor_cpp" else "torch")


@pytest.mark.parametrize("kind", ["cross_entropy", "autograd", "taylor", "taylor_cpp"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("name,lr", [("sgd", 0.1), ("momentum", 0.05), ("adam", 0.01)])
def test_stacked_training_equals_torch_optim_on_each_network(name, lr, batched, kind):
    """Backpropagation written out, with the loss's closed-form or autograd logit gradient, is
    autograd + torch.optim on each network (float64)."""
    x, y, batches, model = _problem()
    stacked_loss, reference_loss = _losses(kind)
    seeds = [11, 12, 13]
    params = {k: v.to(DT) for k, v in inner.init_params(model, seeds, torch.device("cpu")).items()}
    optimizer = inner.InnerOptimizer(name, lr)
    state = optimizer.init_state(params)
    losses = inner.train(params, stacked_loss, optimizer, state, x, y, batches, batched=batched)
    assert state["step"] == batches.shape[1]
    for i, seed in enumerate(seeds):
        net = inner.mlp(x.shape[1], (7, 5), 4).to(DT)
        with torch.no_grad():
            for (_, p), start in zip(net.named_parameters(), inner.init_params(
                    model, [seed], torch.device("cpu")).values()):
                p.copy_(start[0])
        opt = _torch_optimizer(name, net.parameters(), lr)
        for t in range(batches.shape[1]):
            opt.zero_grad()
            loss = reference_loss(net(x[batches[i, t]]), y[batches[i, t]])
            loss.backward()
            opt.step()
            torch.testing.assert_close(losses[i, t], loss.detach(), rtol=1e-10, atol=1e-12)
        for (_, p), stacked in zip(net.named_parameters(), params.values()):
            torch.testing.assert_close(stacked[i], p.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", [TaylorLoss(backend="torch"), F.cross_entropy],
                         ids=["taylor", "cross_entropy"])
def test_closed_form_losses_train_without_autograd(loss, monkeypatch):
    """The inner step takes the logit gradient of TaylorLoss and cross-entropy in closed form:
    autograd is never called."""
    def no_autograd(*args, **kwargs):
        raise AssertionError("the inner step called torch.autograd.grad")

    monkeypatch.setattr(torch.autograd, "grad", no_autograd)
    x, y, batches, model = _problem()
    params = {k: v.to(DT) for k, v in inner.init_params(model, [1, 2, 3], torch.device("cpu")).items()}
    optimizer = inner.InnerOptimizer("sgd", 0.1)
    losses = inner.train(params, loss, optimizer, optimizer.init_state(params), x, y, batches)
    assert torch.isfinite(losses).all()
    with pytest.raises(AssertionError, match="called torch.autograd.grad"):
        inner.train(params, lambda z, t, reduction: loss(z, t, reduction=reduction), optimizer,
                    optimizer.init_state(params), x, y, batches)


def test_training_in_two_parts_equals_one_run():
    """What warm starts rely on: the optimiser state carries the run on exactly."""
    x, y, batches, model = _problem(steps=10)
    optimizer = inner.InnerOptimizer("adam", 0.01)
    whole = inner.init_params(model, [1, 2, 3], torch.device("cpu"))
    whole = {k: v.to(DT) for k, v in whole.items()}
    parts = {k: v.clone() for k, v in whole.items()}
    state_whole, state_parts = optimizer.init_state(whole), optimizer.init_state(parts)
    inner.train(whole, F.cross_entropy, optimizer, state_whole, x, y, batches)
    inner.train(parts, F.cross_entropy, optimizer, state_parts, x, y, batches[:, :4])
    inner.train(parts, F.cross_entropy, optimizer, state_parts, x, y, batches[:, 4:])
    for k in whole:
        assert torch.equal(whole[k], parts[k])
    assert state_whole["step"] == state_parts["step"] == 10


def test_the_fused_taylor_loss_trains_like_the_differentiable_family():
    x, y, batches, model = _problem()
    x = x.float()
    omega = cross_entropy_taylor_init(4, 4)
    fused = TaylorLoss(omega, 4, backend="torch")
    from domainbed_itl.losses import taylor_loss

    def horner(logits, target, reduction="mean"):
        return taylor_loss(logits, target, torch.tensor(omega), 4, reduction)

    model = model.float()
    runs = []
    for loss in (fused, horner):
        params = inner.init_params(model, [5, 6, 7], torch.device("cpu"))
        optimizer = inner.InnerOptimizer("sgd", 0.5)
        inner.train(params, loss, optimizer, optimizer.init_state(params), x, y, batches)
        runs.append(inner.flat(params))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


def test_init_params_are_the_model_init_seeded_and_flat_follows_named_parameters():
    _, _, _, model = _problem()
    a = inner.init_params(model, [3, 4], torch.device("cpu"))
    b = inner.init_params(model, [3], torch.device("cpu"))
    assert all(torch.equal(a[k][0], b[k][0]) for k in a)
    assert not torch.equal(a["0.weight"][0], a["0.weight"][1])
    rows = inner.flat(a)
    assert rows.shape == (2, sum(p.numel() for p in model.parameters()))
    assert torch.equal(rows[1, :7 * 6], a["0.weight"][1].reshape(-1))


def test_predict_matches_the_module_and_unknown_optimizers_are_refused():
    x, _, _, model = _problem()
    params = inner.init_params(model, [9], torch.device("cpu"))
    net = inner.mlp(x.shape[1], (7, 5), 4).to(DT)
    with torch.no_grad():
        for (_, p), q in zip(net.named_parameters(), params.values()):
            p.copy_(q[0])
    torch.testing.assert_close(inner.predict({k: v.to(DT) for k, v in params.items()}, x, chunk=7)[0],
                               net(x))
    with pytest.raises(ValueError, match="unknown inner optimizer 'lbfgs'; expected one of sgd, "
                                         "momentum, adam"):
        inner.InnerOptimizer("lbfgs")
