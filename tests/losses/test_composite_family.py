"""The composite family (issue 24, item 6): its members include CE (its default), label
smoothing, Poly-1, focal loss and the Taylor losses, each to float tolerance."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from domainbed_itl.losses import ITL_PARAMETERS, get_family, taylor_loss, zoo
from domainbed_itl.losses.builtin_families import COMPOSITE_TAYLOR_ORDER
from domainbed_itl.losses.checks import check_minimisable

FAMILY = get_family("composite")
CLASSES = 5


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(16, CLASSES, dtype=torch.float64, generator=g) * 3,
            torch.randint(CLASSES, (16,), generator=g))


def _omega(ce_weight=1.0, gamma=0.0, smoothing=0.0, poly1=0.0, taylor=None):
    taylor = taylor if taylor is not None else [1.0, 0.0] + [0.0] * 10
    return torch.tensor([ce_weight, gamma, smoothing, poly1, *taylor], dtype=torch.float64)


def test_the_default_is_cross_entropy_exactly():
    logits, target = _batch()
    default = torch.tensor(FAMILY.default_parameters(CLASSES), dtype=torch.float64)
    torch.testing.assert_close(default, _omega())
    value = FAMILY.loss(logits, target, default, reduction="none")
    torch.testing.assert_close(value, zoo.cross_entropy(logits, target, reduction="none"), rtol=0, atol=1e-12)
    module = FAMILY.module(FAMILY.default_parameters(CLASSES))
    torch.testing.assert_close(module(logits.float(), target), zoo.cross_entropy(logits.float(), target))


@pytest.mark.parametrize("omega, reference", [
    (_omega(smoothing=0.2), lambda z, t: zoo.label_smoothing(z, t, 0.2, reduction="none")),
    (_omega(smoothing=0.7), lambda z, t: zoo.label_smoothing(z, t, 0.7, reduction="none")),
    (_omega(poly1=2.0), lambda z, t: zoo.poly1(z, t, 2.0, reduction="none")),
    (_omega(poly1=-1.0), lambda z, t: zoo.poly1(z, t, -1.0, reduction="none")),
    (_omega(gamma=2.0), lambda z, t: zoo.focal(z, t, 2.0, reduction="none")),
    (_omega(gamma=0.5), lambda z, t: zoo.focal(z, t, 0.5, reduction="none")),
    (_omega(ce_weight=0.0, taylor=list(ITL_PARAMETERS)),
     lambda z, t: taylor_loss(z, t, torch.tensor(ITL_PARAMETERS, dtype=z.dtype), 4, reduction="none")),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_members_reproduce_each_family(omega, reference, seed):
    logits, target = _batch(seed)
    FAMILY.check(omega)
    torch.testing.assert_close(FAMILY.loss(logits, target, omega, reduction="none"),
                               reference(logits, target), rtol=1e-10, atol=1e-12)


def test_a_taylor_member_is_the_taylor_familys_loss_at_any_omega():
    logits, target = _batch()
    omega = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = get_family("taylor", COMPOSITE_TAYLOR_ORDER).loss(logits, target, omega, reduction="none")
    got = FAMILY.loss(logits, target, _omega(ce_weight=0.0, taylor=omega.tolist()), reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradients_in_omega_at_ce_are_the_members_directions():
    """At CE, ∂L/∂α = 1 − p_t (Poly-1), ∂L/∂ε = log p_t − mean_c log p_c (smoothing), and
    ∂L/∂γ = −log(1 − p_t) log p_t (focal): each member is a direction out of CE."""
    logits, target = _batch()
    per_sample = grad(lambda w, z, t: FAMILY.loss(z.unsqueeze(0), t.unsqueeze(0), w))
    g = vmap(per_sample, in_dims=(None, 0, 0))(_omega(), logits, target)
    log_probs = logits.log_softmax(1)
    log_p = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(g[:, 3], 1 - log_p.exp())
    torch.testing.assert_close(g[:, 2], log_p - log_probs.mean(1))
    torch.testing.assert_close(g[:, 1], -torch.log1p(-log_p.exp()) * log_p)
    assert torch.isfinite(g).all()


def test_ranges_and_minimisability():
    assert [p.interval for p in FAMILY.parameters[:4]] == ["[0, inf)", "[0, inf)", "[0, 1)", "[-1, inf)"]
    assert FAMILY.num_params == 16
    check_minimisable(FAMILY.module(FAMILY.default_parameters(CLASSES)), CLASSES)
    with pytest.raises(ValueError, match=r"smoothing_epsilon .* must be finite and in \[0, 1\), "
                                         r"got smoothing_epsilon=1.0"):
        FAMILY.check(_omega(smoothing=1.0))
