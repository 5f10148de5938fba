"""The minimisability check: finite along p_true, and lower somewhere for a more probable true class."""

import functools

import pytest
import torch

from domainbed_itl.losses import LOSS_PRESETS, TaylorLoss, cross_entropy_taylor_init, zoo
from domainbed_itl.losses.checks import LossCheckError, check_minimisable, loss_along_p_true

CLASS_COUNTS = (2, 5, 7, 10, 65, 345)  # DomainBed's datasets: binary to DomainNet


def test_the_curve_is_cross_entropys_closed_form():
    p, values, slopes = loss_along_p_true(zoo.cross_entropy, 10, dtype=torch.float64)
    assert p[0].item() == pytest.approx(1e-4) and p[-1].item() == pytest.approx(1 - 1e-4)
    torch.testing.assert_close(values, -p.log())
    torch.testing.assert_close(slopes, -1 / p)


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_the_shipped_losses_are_minimisable(num_classes):
    check_minimisable(LOSS_PRESETS["ITL"].module(), num_classes)  # Table 8, negated as minimised
    check_minimisable(TaylorLoss(cross_entropy_taylor_init(4, num_classes)), num_classes)
    for loss in zoo.ZOO.values():
        check_minimisable(loss, num_classes)


def _negated(loss):
    return lambda logits, target, reduction="mean": -loss(logits, target, reduction=reduction)


@pytest.mark.parametrize("loss, message", [
    (_negated(LOSS_PRESETS["ITL"].module()), r"would be maximised, not minimised: it never decreases as "
                                        r"the true-class probability grows .*10 classes"),
    (TaylorLoss([v if i < 2 else -v for i, v in enumerate(cross_entropy_taylor_init(4, 10))]),
     "would be maximised"),  # +log p: the Taylor expansion of CE with the wrong sign
    (TaylorLoss([0.0] * 12), "would be maximised"),  # constant: minimises nothing
    (functools.partial(zoo.sce, alpha=-0.1, beta=-1.0), "would be maximised"),
    (TaylorLoss([1e30] * 12), r"is not finite: its value is nan at p_true = 0\.0001"),
])
def test_losses_that_cannot_be_minimised_are_refused_with_the_reason(loss, message):
    with pytest.raises(LossCheckError, match=message):
        check_minimisable(loss, 10, "the loss")


def test_a_loss_that_decreases_somewhere_passes():
    # -log p + 8 p^2 rises for p > 1/4 but falls below it: minimisable, so not refused.
    def bowl(logits, target, reduction="mean"):
        p = logits.softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
        return -p.log() + 8 * p ** 2

    check_minimisable(bowl, 10)
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        check_minimisable(bowl, 1)
