"""The stacked inner loop against one network trained by torch.optim, and its optimisers' state."""

from __future__ import annotations

import math

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


def _torch_optimizer(name, params, lr, weight_decay=0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=inner.ADAM_BETAS, eps=inner.ADAM_EPS,
                            weight_decay=weight_decay)


def _torch_net(model, seed, features):
    """network `seed` of init_params as a module of its own, in float64."""
    net = inner.mlp(features, (7, 5), 4).to(DT)
    with torch.no_grad():
        for p, start in zip(net.parameters(), inner.init_params(
                model, [seed], torch.device("cpu")).values()):
            p.copy_(start[0])
    return net


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


# ------------------------------------------------------- schedules, weight decay, stopping rule


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_learning_rates_anneal_to_zero_over_the_steps(schedule):
    lrs = inner.learning_rates(schedule, 0.2, 8)
    assert len(lrs) == 8 and lrs[0] == 0.2
    expected = ([0.1 * (1 + math.cos(math.pi * t / 8)) for t in range(8)] if schedule == "cosine"
                else [0.2 * (1 - t / 8) for t in range(8)])
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    assert inner.learning_rates("constant", 0.2, 8) is None
    with pytest.raises(ValueError, match="unknown inner schedule 'step'; expected one of constant, "
                                         "cosine, linear"):
        inner.learning_rates("step", 0.2, 8)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("name,lr", [("sgd", 0.1), ("momentum", 0.05), ("adam", 0.01)])
def test_a_schedule_and_weight_decay_train_as_torch_optim_with_coupled_l2(name, lr, batched):
    """Per-step learning rates and λ/2‖θ‖² (λθ added to the gradient, torch.optim's weight_decay)."""
    x, y, batches, model = _problem()
    seeds, decay = [11, 12, 13], 0.3
    lrs = inner.learning_rates("cosine", lr, batches.shape[1])
    params = {k: v.to(DT) for k, v in inner.init_params(model, seeds, torch.device("cpu")).items()}
    optimizer = inner.InnerOptimizer(name, lr)
    losses = inner.train(params, F.cross_entropy, optimizer, optimizer.init_state(params), x, y,
                         batches, batched=batched, lrs=lrs, weight_decay=decay)
    for i, seed in enumerate(seeds):
        net = _torch_net(model, seed, x.shape[1])
        opt = _torch_optimizer(name, net.parameters(), lr, weight_decay=decay)
        for t in range(batches.shape[1]):
            opt.param_groups[0]["lr"] = lrs[t]
            opt.zero_grad()
            loss = F.cross_entropy(net(x[batches[i, t]]), y[batches[i, t]])
            loss.backward()
            opt.step()
            torch.testing.assert_close(losses[i, t], loss.detach(), rtol=1e-10, atol=1e-12)
        for p, stacked in zip(net.parameters(), params.values()):
            torch.testing.assert_close(stacked[i], p.detach(), rtol=1e-9, atol=1e-12)


def test_stacked_grad_norms_are_the_objectives_gradient_norms_per_network():
    x, y, _, model = _problem()
    params = {k: v.to(DT) for k, v in inner.init_params(model, [1, 2], torch.device("cpu")).items()}
    index = [torch.arange(0, 30), torch.arange(10, 25)]
    got = inner.stacked_grad_norms(params, F.cross_entropy, x, y, index, weight_decay=0.2)
    for i, (seed, idx) in enumerate(zip([1, 2], index)):
        net = _torch_net(model, seed, x.shape[1])
        objective = F.cross_entropy(net(x[idx]), y[idx]) + 0.1 * sum(
            p.pow(2).sum() for p in net.parameters())
        grads = torch.autograd.grad(objective, list(net.parameters()))
        assert float(got[i]) == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads]).norm()),
                                              rel=1e-12)


def _full_batch(n=4, steps=120, examples=40):
    """Full-batch gradient descent: every step takes all examples, so the trajectory is smooth."""
    x, y, _, model = _problem(n=n)
    batches = torch.arange(examples).expand(n, steps, examples)
    return x, y, batches, model


@pytest.mark.parametrize("batched", [True, False])
def test_the_stopping_rule_stops_each_network_at_its_first_check_below_the_ratio(batched):
    """Against the same networks trained without the rule, their norms read at every check:
    each network stops at the first check where ‖g‖ <= ratio·‖g_0‖ and from then on does not
    change; the others are the unstopped networks at the cap."""
    x, y, batches, model = _full_batch()
    seeds, decay, every, ratio = [3, 4, 5, 6], 0.05, 10, 0.06
    check = [torch.arange(40)] * 4
    optimizer = inner.InnerOptimizer("sgd", 0.5)
    start = {k: v.to(DT) for k, v in inner.init_params(model, seeds, torch.device("cpu")).items()}
    # The reference: no rule, the norms and parameters at every check.
    ref = {k: v.clone() for k, v in start.items()}
    state = optimizer.init_state(ref)
    norm0 = inner.stacked_grad_norms(ref, F.cross_entropy, x, y, check, decay)
    snapshots, norms, ref_losses = [], [], []
    for t in range(0, batches.shape[1], every):
        ref_losses.append(inner.train(ref, F.cross_entropy, optimizer, state, x, y,
                                      batches[:, t:t + every], weight_decay=decay))
        snapshots.append({k: v.clone() for k, v in ref.items()})
        norms.append(inner.stacked_grad_norms(ref, F.cross_entropy, x, y, check, decay))
    ref_losses = torch.cat(ref_losses, dim=1)
    expected_stop = []
    for i in range(4):
        below = [c for c in range(len(norms)) if norms[c][i] <= ratio * norm0[i]]
        expected_stop.append(below[0] if below else None)
    assert None in expected_stop and len({s for s in expected_stop if s is not None}) > 1, \
        "the problem must stop networks at different checks and leave one running"

    params = {k: v.clone() for k, v in start.items()}
    state = optimizer.init_state(params)
    run = inner.train_until_stationary(params, F.cross_entropy, optimizer, state, x, y, batches,
                                       check, inner.StopRule(ratio, every), batched=batched,
                                       weight_decay=decay)
    cap = batches.shape[1]
    assert run.steps_used == [cap if c is None else (c + 1) * every for c in expected_stop]
    assert state["step"] == cap
    torch.testing.assert_close(run.start_norm, norm0, rtol=0, atol=0)
    for i, c in enumerate(expected_stop):
        used = run.steps_used[i]
        snapshot = snapshots[-1 if c is None else c]
        for k in params:
            torch.testing.assert_close(params[k][i], snapshot[k][i], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(run.final_norm[i], norms[-1 if c is None else c][i],
                                   rtol=1e-10, atol=0)
        torch.testing.assert_close(run.losses[i, :used], ref_losses[i, :used], rtol=1e-12, atol=0)
        assert torch.isnan(run.losses[i, used:]).all()
        if c is not None:
            assert run.final_norm[i] <= ratio * run.start_norm[i]


def test_stopped_networks_keep_their_optimiser_state_and_tail_loss_reads_each_network():
    x, y, batches, model = _full_batch(n=2, steps=60)
    optimizer = inner.InnerOptimizer("adam", 0.05)
    params = {k: v.to(DT) for k, v in inner.init_params(model, [3, 9], torch.device("cpu")).items()}
    state = optimizer.init_state(params)
    check = [torch.arange(40)] * 2
    # A ratio between the two networks' ratios at the first check: one stops there, one goes on.
    first = {k: v.clone() for k, v in params.items()}
    first_state = optimizer.init_state(first)
    inner.train(first, F.cross_entropy, optimizer, first_state, x, y, batches[:, :10])
    ratios = (inner.stacked_grad_norms(first, F.cross_entropy, x, y, check)
              / inner.stacked_grad_norms(params, F.cross_entropy, x, y, check)).tolist()
    stops, goes_on = (0, 1) if ratios[0] < ratios[1] else (1, 0)
    run = inner.train_until_stationary(params, F.cross_entropy, optimizer, state, x, y, batches,
                                       check, inner.StopRule(sum(ratios) / 2, 10))
    assert run.steps_used[stops] == 10 and run.steps_used[goes_on] > 10
    for k in params:
        assert torch.equal(params[k][stops], first[k][stops])
        assert torch.equal(state["exp_avg"][k][stops], first_state["exp_avg"][k][stops])
        assert torch.equal(state["exp_avg_sq"][k][stops], first_state["exp_avg_sq"][k][stops])
    assert state["step"] == run.steps_used[goes_on]
    tail = inner.tail_loss(run.losses, run.steps_used)
    assert float(tail[stops]) == float(run.losses[stops, 9])
    u = run.steps_used[goes_on]
    assert float(tail[goes_on]) == pytest.approx(float(run.losses[goes_on, u - u // 10:u].mean()))


def test_fit_without_a_rule_is_train():
    x, y, batches, model = _problem()
    params = {k: v.to(DT) for k, v in inner.init_params(model, [1, 2, 3], torch.device("cpu")).items()}
    copy = {k: v.clone() for k, v in params.items()}
    optimizer = inner.InnerOptimizer("sgd", 0.1)
    run = inner.fit(params, F.cross_entropy, optimizer, optimizer.init_state(params), x, y, batches,
                    check=[])
    losses = inner.train(copy, F.cross_entropy, optimizer, optimizer.init_state(copy), x, y, batches)
    assert torch.equal(run.losses, losses) and run.steps_used == [batches.shape[1]] * 3
    assert run.start_norm is None and all(torch.equal(params[k], copy[k]) for k in params)
