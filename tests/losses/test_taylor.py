"""The Taylor loss family: definition (Eq. 8-10), term order, implementations, orientation."""

import math

import pytest
import torch
import torch.nn.functional as F

from domainbed_itl.losses import (ITL_PARAMETERS, TaylorLoss, cross_entropy_taylor_init,
                                  num_taylor_params, taylor_loss, taylor_loss_reference,
                                  taylor_terms)
from domainbed_itl.losses import cpu_kernel
from domainbed_itl.losses.taylor import _horner, _label_coefficients


@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    """Both implementations of the fused fixed-ω loss: the C++ kernel and the torch ops."""
    if request.param == "cpp" and cpu_kernel.load() is None:
        pytest.skip(f"the C++ kernel cannot be built here: {cpu_kernel.load_error()}")
    return request.param


def test_order4_is_eq10():
    # Eq. 10: ω2..ω5 pure ŷ powers, then ω6..ω11 = (1,1),(1,2),(2,1),(3,1),(1,3),(2,2).
    assert taylor_terms(4) == [(1, 0), (2, 0), (3, 0), (4, 0),
                               (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2)]
    assert num_taylor_params(4) == 12 == len(ITL_PARAMETERS)


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_terms_are_every_monomial_with_yhat(order):
    terms = taylor_terms(order)
    expected = {(i, j) for i in range(1, order + 1) for j in range(order + 1) if i + j <= order}
    assert len(terms) == len(set(terms)) and set(terms) == expected
    assert num_taylor_params(order) == 2 + len(expected)


@pytest.mark.parametrize("order", [0, 1, 6, 4.0, "4", True])
def test_bad_order_is_rejected(order):
    with pytest.raises(ValueError, match="order"):
        taylor_terms(order)


def test_hand_computed_value():
    # Order 2, ω = (0.5, 0, 1, 2, 3): ℓ = u + 2u² + 3uv with u = ŷ-0.5, v = y.
    # ŷ = (0.75, 0.25), true class 0: ℓ0 = 0.25 + 0.125 + 0.75, ℓ1 = -0.25 + 0.125.
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    target = torch.tensor([0])
    omega = torch.tensor([0.5, 0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    expected = -(1.125 - 0.125) / 2
    assert taylor_loss_reference(logits, target, omega, 2).item() == pytest.approx(expected)
    assert taylor_loss(logits, target, omega, 2).item() == pytest.approx(expected)
    assert TaylorLoss(omega.tolist(), 2)(logits, target).item() == pytest.approx(expected)


@pytest.mark.parametrize("order", [2, 3, 4, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_implementations_agree(order, reduction, backend):
    gen = torch.Generator().manual_seed(order)
    logits = torch.randn(16, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randint(0, 7, (16,), generator=gen)
    omega = torch.randn(num_taylor_params(order), dtype=torch.float64, generator=gen,
                        requires_grad=True)
    ref = taylor_loss_reference(logits, target, omega, order, reduction)
    horner = taylor_loss(logits, target, omega, order, reduction)
    fast = TaylorLoss(omega.tolist(), order, backend)(logits, target, reduction)
    torch.testing.assert_close(horner, ref)
    torch.testing.assert_close(fast, ref.detach())
    (g_ref_z, g_ref_w) = torch.autograd.grad(ref.sum(), (logits, omega))
    (g_h_z, g_h_w) = torch.autograd.grad(horner.sum(), (logits, omega))
    (g_f_z,) = torch.autograd.grad(fast.sum(), logits)
    torch.testing.assert_close(g_h_z, g_ref_z)
    torch.testing.assert_close(g_h_w, g_ref_w)
    torch.testing.assert_close(g_f_z, g_ref_z)


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_loss_and_grad_is_the_per_sample_loss_and_its_gradient(order, backend):
    """The closed form the inner loop uses without autograd: per-sample values and
    ∂loss_b/∂logits_b equal the term-by-term definition under autograd (float64)."""
    gen = torch.Generator().manual_seed(20 + order)
    logits = torch.randn(16, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randint(0, 7, (16,), generator=gen)
    omega = torch.randn(num_taylor_params(order), dtype=torch.float64, generator=gen)
    ref = taylor_loss_reference(logits, target, omega, order, "none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    values, grad = TaylorLoss(omega.tolist(), order, backend).loss_and_grad(logits.detach(), target)
    torch.testing.assert_close(values, ref.detach())
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("order", [2, 4, 5])
def test_gradcheck_float64(order, backend):
    gen = torch.Generator().manual_seed(10 + order)
    logits = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randint(0, 4, (5,), generator=gen)
    omega = torch.randn(num_taylor_params(order), dtype=torch.float64, generator=gen,
                        requires_grad=True)
    loss = TaylorLoss(omega.tolist(), order, backend)
    assert torch.autograd.gradcheck(lambda z: loss(z, target, reduction="none"), (logits,))
    assert torch.autograd.gradcheck(lambda z, w: taylor_loss(z, target, w, order), (logits, omega))
    assert torch.autograd.gradgradcheck(lambda z, w: taylor_loss(z, target, w, order),
                                        (logits, omega))


def test_fast_loss_refuses_double_backward(backend):
    logits = torch.randn(3, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(TaylorLoss(backend=backend)(logits, torch.tensor([0, 1, 2])), logits,
                                  create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_fast_loss_follows_dtype_and_eval_mode(backend):
    loss = TaylorLoss(backend=backend)
    target = torch.tensor([1, 0])
    z32 = torch.randn(2, 3)
    with torch.no_grad():
        assert loss(z32, target).dtype == torch.float32
    z64 = z32.double()
    torch.testing.assert_close(loss(z64, target).float(), loss(z32, target))


@pytest.mark.parametrize("bad", [torch.tensor([0.0, 1.0]), torch.tensor([[0], [1]]), torch.tensor([0])])
def test_bad_targets_are_rejected(bad, backend):
    with pytest.raises(ValueError, match="target"):
        TaylorLoss(backend=backend)(torch.randn(2, 3), bad)


def test_out_of_range_class_is_an_error(backend):
    with pytest.raises((RuntimeError, IndexError), match="out of"):
        TaylorLoss(backend=backend)(torch.randn(2, 3), torch.tensor([0, 3]))


def test_backends_agree_on_a_large_batch():
    if cpu_kernel.load() is None:
        pytest.skip(f"the C++ kernel cannot be built here: {cpu_kernel.load_error()}")
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2000, 345, generator=gen, requires_grad=True)  # DomainNet's 345 classes
    target = torch.randint(0, 345, (2000,), generator=gen)
    values, grads = [], []
    for backend in ("cpp", "torch"):
        loss = TaylorLoss(backend=backend)(logits, target)
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, logits)[0])
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])


def _never_built():
    raise AssertionError("the C++ kernel was loaded on the default path")


def test_the_default_path_never_loads_the_kernel(monkeypatch):
    monkeypatch.delenv(cpu_kernel.ENV, raising=False)
    monkeypatch.setattr(cpu_kernel, "load", _never_built)
    logits = torch.randn(4, 3, requires_grad=True)
    TaylorLoss()(logits, torch.tensor([0, 1, 2, 0])).backward()
    monkeypatch.setenv(cpu_kernel.ENV, "0")
    TaylorLoss()(logits, torch.tensor([0, 1, 2, 0])).backward()


def test_the_environment_variable_opts_in(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernel, "load", lambda: calls.append(1))  # None: "auto" falls back
    monkeypatch.setenv(cpu_kernel.ENV, "1")
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert TaylorLoss()(logits, target) == TaylorLoss(backend="torch")(logits, target)
    assert calls == [1]
    monkeypatch.setenv(cpu_kernel.ENV, "yes")
    with pytest.raises(ValueError, match="DOMAINBED_ITL_CPU_KERNEL must be 1 .* or 0, got 'yes'"):
        TaylorLoss()(logits, target)


def test_a_fresh_process_compiles_nothing_by_default(tmp_path):
    """ITL training steps on the CPU leave torch's extension cache empty (nothing is built)."""
    import os
    import subprocess
    import sys

    code = ("import torch; from domainbed_itl.losses import TaylorLoss; "
            "z = torch.randn(8, 5, requires_grad=True); "
            "TaylorLoss()(z, torch.randint(0, 5, (8,))).backward(); print(z.grad.abs().sum() > 0)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    env.pop(cpu_kernel.ENV, None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "tensor(True)", result.stderr
    assert not (tmp_path / "cache").exists()


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of auto, cpp, torch, got 'cuda'"):
        TaylorLoss(backend="cuda")


def test_wrong_parameter_count_is_rejected():
    with pytest.raises(ValueError, match="order 4 has 12 parameters, got 11"):
        TaylorLoss(ITL_PARAMETERS[:-1], 4)


def test_itl_decreases_with_true_class_probability():
    """Orientation (a): ∂loss/∂ŷ_true = -(1/C) ∂ℓ(ŷ, 1)/∂ŷ < 0 on [0, 1] for the ITL preset."""
    omega = torch.tensor(ITL_PARAMETERS, dtype=torch.float64)
    _, c1 = _label_coefficients(omega, 4)
    yhat = torch.linspace(0, 1, 1001, dtype=torch.float64, requires_grad=True)
    (d_ell,) = torch.autograd.grad(_horner(yhat - omega[0], c1).sum(), yhat)
    d_loss = -d_ell / 10
    assert (d_loss < 0).all()
    # ...and the whole loss falls as a confident correct prediction grows more confident.
    target = torch.tensor([3])
    values = [TaylorLoss()(torch.nn.functional.one_hot(target, 10).double() * s, target).item()
              for s in (0.0, 1.0, 3.0, 10.0)]
    assert values == sorted(values, reverse=True)


def test_cross_entropy_init_approximates_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3]], dtype=torch.float64)
    target = torch.tensor([0, 2])
    omega = torch.tensor(cross_entropy_taylor_init(5, 3), dtype=torch.float64)
    approx = taylor_loss(logits, target, omega, 5, reduction="none")
    probs = logits.softmax(1)[torch.arange(2), target]
    x = 1 - probs  # -log p = Σ_k x^k / k; the order-5 expansion keeps k <= 4
    torch.testing.assert_close(approx, sum(x ** k / k for k in range(1, 5)))
    assert (approx - F.cross_entropy(logits, target, reduction="none")).abs().max() < 0.1


def _blobs(n, gen):
    centres = torch.randn(10, 20, generator=gen) * 3
    y = torch.randint(0, 10, (n,), generator=gen)
    return centres[y] + torch.randn(n, 20, generator=gen), y


def _train(sign, x, y, steps=300):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = TaylorLoss()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = sign * loss_fn(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def test_orientation_trains_a_network():
    """Orientation (b): minimising -mean ℓ (our loss) learns; minimising +mean ℓ does not."""
    gen = torch.Generator().manual_seed(0)
    x, y = _blobs(3000, gen)
    x_test, y_test = x[2000:], y[2000:]
    accuracy = {}
    for sign in (1.0, -1.0):
        net = _train(sign, x[:2000], y[:2000])
        accuracy[sign] = (net(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy[1.0] > 0.9
    assert accuracy[-1.0] < 0.1


def test_orientation_on_real_mnist(mnist10k):
    """The same on real MNIST digits (the shared offline folder)."""
    torchvision = pytest.importorskip("torchvision")
    data = torchvision.datasets.MNIST(str(mnist10k), train=True, download=False)
    x = data.data.float().div(255).flatten(1)
    y = data.targets
    accuracy = {}
    for sign in (1.0, -1.0):
        net = _train(sign, x[:6000], y[:6000], steps=400)
        accuracy[sign] = (net(x[6000:]).argmax(1) == y[6000:]).float().mean().item()
    assert accuracy[1.0] > 0.85
    assert accuracy[-1.0] < 0.1


def test_state_dict_holds_no_loss_parameters():
    """The fixed loss is set at construction; models trained with it load into their base."""
    assert TaylorLoss().state_dict() == {}
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    net.loss = TaylorLoss()
    torch.nn.Sequential(torch.nn.Linear(3, 2)).load_state_dict(net.state_dict())
