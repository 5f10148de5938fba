"""The robust-loss zoo against hand-computed values and float64 gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from domainbed_itl.losses import ZOO, bce, cross_entropy, focal, gce, label_smoothing, poly, poly1, sce

# ŷ = softmax((log 3, 0)) = (0.75, 0.25); the true class is 0.
LOGITS = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
TARGET = torch.tensor([0])
P = 0.75


def test_cross_entropy():
    assert cross_entropy(LOGITS, TARGET).item() == pytest.approx(-math.log(P))


def test_bce_sums_the_one_vs_all_problems():
    s = torch.sigmoid(LOGITS[0])
    expected = -math.log(s[0]) - math.log(1 - s[1])
    assert bce(LOGITS, TARGET).item() == pytest.approx(expected)


def test_focal():
    assert focal(LOGITS, TARGET, gamma=2.0).item() == pytest.approx(-(0.25 ** 2) * math.log(P))
    assert focal(LOGITS, TARGET, gamma=0.0).item() == pytest.approx(-math.log(P))


def test_sce():
    expected = 0.1 * -math.log(P) + 1.0 * 4.0 * (1 - P)
    assert sce(LOGITS, TARGET, alpha=0.1, beta=1.0).item() == pytest.approx(expected)


def test_gce():
    assert gce(LOGITS, TARGET, q=0.7).item() == pytest.approx((1 - P ** 0.7) / 0.7)
    assert gce(LOGITS, TARGET, q=1.0).item() == pytest.approx(1 - P)  # MAE-like end of the family


def test_label_smoothing():
    eps = 0.2
    expected = (1 - eps) * -math.log(P) + eps * 0.5 * (-math.log(0.75) - math.log(0.25))
    assert label_smoothing(LOGITS, TARGET, epsilon=eps).item() == pytest.approx(expected)


def test_poly1_is_ce_plus_epsilon_times_one_minus_p():
    for eps in (-1.0, 0.0, 2.0):
        assert poly1(LOGITS, TARGET, epsilon=eps).item() == pytest.approx(-math.log(P) + eps * (1 - P))
    # ε_j = 1/j for j = 1..N adds the first N terms of CE's own expansion Σ_j (1-p)^j / j once more.
    doubled = -math.log(P) + sum((1 - P) ** j / j for j in (1, 2, 3))
    assert poly(LOGITS, TARGET, [1.0, 1 / 2, 1 / 3]).item() == pytest.approx(doubled)
    torch.testing.assert_close(poly(LOGITS, TARGET, [0.0, 0.0]), cross_entropy(LOGITS, TARGET))


def test_tensor_parameters_give_the_same_values():
    for fn, name, value in ((focal, "gamma", 1.5), (gce, "q", 0.4), (label_smoothing, "epsilon", 0.3)):
        torch.testing.assert_close(fn(LOGITS, TARGET, **{name: torch.tensor(value, dtype=torch.float64)}),
                                   fn(LOGITS, TARGET, **{name: value}))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_gradcheck_and_reductions(name):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randint(0, 5, (6,), generator=gen)
    fn = ZOO[name]
    assert torch.autograd.gradcheck(lambda z: fn(z, target, reduction="none"), (logits,))
    per_sample = fn(logits, target, reduction="none")
    assert per_sample.shape == (6,)
    torch.testing.assert_close(fn(logits, target), per_sample.mean())
    torch.testing.assert_close(fn(logits, target, reduction="sum"), per_sample.sum())


def test_every_loss_falls_as_the_true_class_gains():
    target = torch.tensor([1])
    for name, fn in ZOO.items():
        values = [fn(F.one_hot(target, 4).double() * s, target).item() for s in (0.0, 1.0, 4.0)]
        assert values == sorted(values, reverse=True), name


@pytest.mark.parametrize("call,match", [
    (lambda: gce(LOGITS, TARGET, q=0.0), r"GCE q must be in \(0, 1\], got 0.0"),
    (lambda: label_smoothing(LOGITS, TARGET, epsilon=1.0), r"label smoothing epsilon must be in \[0, 1\)"),
    (lambda: focal(LOGITS, TARGET, reduction="avg"), "reduction"),
    (lambda: focal(LOGITS, TARGET, gamma=math.nan), "focal gamma must be a finite number >= 0, got nan"),
    (lambda: sce(LOGITS, TARGET, beta=math.inf), "sce beta must be a finite number, got inf"),
    (lambda: gce(LOGITS, TARGET, q=math.nan), r"GCE q must be in \(0, 1\], got nan"),
    (lambda: poly1(LOGITS, TARGET, epsilon=-1.5), "poly epsilon1 must be a number >= -1/1, got -1.5"),
    (lambda: sce(LOGITS, TARGET.float()), "target"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_int32_targets_are_accepted():
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    for name, fn in ZOO.items():
        torch.testing.assert_close(fn(logits, target.int()), fn(logits, target), msg=name)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_gradient_stays_finite_when_confident(gamma):
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    focal(logits, torch.tensor([0, 1]), gamma=gamma).backward()
    assert torch.isfinite(logits.grad).all()
