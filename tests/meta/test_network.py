"""One base network: the inner loop's batched view against the functional model, per architecture.

For several widths and depths of `mlp`, the batched logits and training steps equal the module's
through functional_call, and the hypergradient assembled as the trainer assembles it (inner.flat,
flatten_module, implicit_grad) equals one computed straight through torch.func (dense Hessian of
the parameter dict, explicit solve). The check between the two views fires on a wrong order or a
wrong hand-written backward.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

from domainbed_itl.losses import cross_entropy_taylor_init, taylor_loss
from domainbed_itl.meta import inner, network
from domainbed_itl.meta.hypergradient import flatten_module, implicit_grad
from domainbed_itl.meta.solvers import dense

DT = torch.float64
CPU = torch.device("cpu")
ARCHITECTURES = [(), (8,), (16, 8), (32, 16, 8)]
FEATURES, CLASSES, ORDER = 5, 3, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _stack(hidden, seeds=(1, 2, 3)):
    model = inner.mlp(FEATURES, hidden, CLASSES)
    params = {k: v.to(DT) for k, v in inner.init_params(model, list(seeds), CPU).items()}
    return model.to(DT), params


def _one(params, i):
    return {k: v[i] for k, v in params.items()}


def _data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=gen, dtype=DT), torch.randint(0, CLASSES, (n,), generator=gen)


@pytest.mark.parametrize("hidden", ARCHITECTURES)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_batched_logits_and_steps_are_the_modules_through_functional_call(hidden, optimizer):
    """Forward: inner.predict = functional_call per network. Backward: one step at lr η with
    momentum 0 (the unfused gradient) or SGD (fused into the products) is θ − η ∂L/∂θ, the
    gradient by torch.func.grad through functional_call."""
    model, params = _stack(hidden)
    x, y = _data(12)
    logits = inner.predict(params, x)
    for i in range(3):
        torch.testing.assert_close(logits[i], functional_call(model, _one(params, i), (x,)),
                                   rtol=1e-12, atol=1e-12)
    batches = torch.arange(12).view(3, 1, 4)
    lr, start = 0.3, {k: v.clone() for k, v in params.items()}
    opt = inner.InnerOptimizer(optimizer, lr, momentum=0.0)
    inner.train(params, F.cross_entropy, opt, opt.init_state(params), x, y, batches)
    for i in range(3):
        idx = batches[i, 0]
        g = grad(lambda p, idx=idx: F.cross_entropy(functional_call(model, p, (x[idx],)), y[idx]))(
            _one(start, i))
        for k in params:
            torch.testing.assert_close(params[k][i], start[k][i] - lr * g[k], rtol=1e-12, atol=1e-12)


def _reference_hypergradient(model, p, omega, x, y, x_out, y_out, decay):
    """dM/dω = −(∂²L/∂θ∂ω)ᵀ H⁻¹ ∂M/∂θ with torch.func on the parameter dict: the dense Hessian
    (torch.func.hessian), the mixed Jacobian (jacrev of grad), an explicit solve."""
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p[n].numel() for n in names}

    def inner_loss(q, o):
        reg = sum((t ** 2).sum() for t in q.values())
        return taylor_loss(functional_call(model, q, (x,)), y, o, ORDER) + 0.5 * decay * reg

    def outer(q):
        return F.cross_entropy(functional_call(model, q, (x_out,)), y_out)

    h = hessian(inner_loss)(p, omega)
    dense_h = torch.cat([torch.cat([h[a][b].reshape(sizes[a], sizes[b]) for b in names], 1)
                         for a in names])
    mixed = jacrev(grad(inner_loss), argnums=1)(p, omega)
    dense_mixed = torch.cat([mixed[a].reshape(sizes[a], -1) for a in names])
    v = torch.cat([t.reshape(-1) for t in (grad(outer)(p)[n] for n in names)])
    return -dense_mixed.T @ torch.linalg.solve(dense_h, v)


@pytest.mark.parametrize("hidden", ARCHITECTURES)
def test_hypergradients_equal_a_torch_func_reference_on_every_architecture(hidden):
    """The trainer's path, inner.train → inner.flat → flatten_module's apply → implicit_grad,
    against `_reference_hypergradient` on the same trained networks."""
    model, params = _stack(hidden, seeds=(4, 5))
    x, y = _data(40)
    x_out, y_out = _data(16, seed=1)
    omega = torch.tensor(cross_entropy_taylor_init(ORDER, CLASSES), dtype=DT)
    decay = 0.5
    loss = lambda logits, target, reduction="mean": taylor_loss(logits, target, omega, ORDER, reduction)  # noqa: E731
    opt = inner.InnerOptimizer("sgd", 0.1)
    batches = torch.randint(0, 40, (2, 30, 8), generator=torch.Generator().manual_seed(2))
    inner.train(params, loss, opt, opt.init_state(params), x, y, batches, weight_decay=decay)
    thetas = inner.flat(params)
    _, apply = flatten_module(model)

    def inner_grad(t: Tensor, o: Tensor) -> Tensor:
        return grad(lambda u: taylor_loss(apply(u, x), y, o, ORDER) + 0.5 * decay * u.pow(2).sum())(t)

    for i in range(2):
        v = grad(lambda t: F.cross_entropy(apply(t, x_out), y_out))(thetas[i])
        ours = implicit_grad(inner_grad, thetas[i], omega, v, dense)
        expected = _reference_hypergradient(model, _one(params, i), omega, x, y, x_out, y_out, decay)
        assert expected.norm() > 1e-6
        torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10)


def test_the_check_fires_when_the_views_parameter_orders_disagree():
    model = inner.mlp(4, (4, 4), 4)
    view = network.checked_view(model)
    order = [2, 3, 0, 1, 4, 5]
    permuted = dataclasses.replace(view, names=tuple(view.names[i] for i in order),
                                   shapes=tuple(view.shapes[i] for i in order))
    with pytest.raises(ValueError, match="not the module's, in flatten_module's order"):
        network.check(permuted, model)
    # the same names in the same order, but two layers reading each other's (same-shaped) weights
    layers = list(view.layers)
    layers[1], layers[2] = (dataclasses.replace(layers[1], weight=layers[2].weight),
                            dataclasses.replace(layers[2], weight=layers[1].weight))
    with pytest.raises(ValueError, match="logits differ from the module's through functional_call"):
        network.check(dataclasses.replace(view, layers=tuple(layers)), model)
    params = inner.init_params(model, [1], CPU)
    swapped = {k: params[k] for k in ["2.weight", "2.bias", "0.weight", "0.bias", "4.weight", "4.bias"]}
    with pytest.raises(ValueError, match="not those of the base network"):
        inner.flat(swapped)


def test_a_wrong_hand_written_backward_is_caught_before_training(monkeypatch):
    wrong = network.Activation("relu", Tensor.relu_, lambda g, out: g)  # forgets ReLU's mask
    monkeypatch.setitem(network.ACTIVATIONS, nn.ReLU, wrong)
    monkeypatch.setattr(network, "_VIEWS", {})
    with pytest.raises(ValueError, match="the batched view's gradient differ"):
        inner.init_params(inner.mlp(FEATURES, (8,), CLASSES), [1], CPU)


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), "no rule for layer 1 \\(Tanh\\(\\)\\)"),
    (nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 3)), "not those of the base network"),
    (nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.ReLU(), nn.Linear(8, 3)), "no rule for layer 2"),
])
def test_only_the_base_network_is_trained_by_the_batched_loop(model, match):
    with pytest.raises(ValueError, match=match):
        inner.init_params(model, [1], CPU)
