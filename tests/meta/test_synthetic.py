"""The synthetic domains: their options, and the command line's data set, on which losses differ."""

import pytest
import torch

from domainbed_itl.losses import ITL_PARAMETERS, TaylorLoss
from domainbed_itl.losses.zoo import ZOO
from domainbed_itl.meta.data import SYNTHETIC_DATASET, synthetic_dataset, synthetic_domains
from domainbed_itl.meta.evaluate import Protocol, evaluate_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_label_noise_replaces_a_share_of_the_labels_and_nothing_else():
    """Domain 0 draws its labels and images before the replacements: the same as without noise,
    but for labels redrawn with probability p (a redraw keeps the label with probability 1/C)."""
    clean = synthetic_domains(2, 2000, 8, 5, seed=3)
    noisy = synthetic_domains(2, 2000, 8, 5, seed=3, label_noise=0.3)
    (x, y), (x_noisy, y_noisy) = clean.domains[0], noisy.domains[0]
    assert torch.equal(x, x_noisy)
    changed = (y != y_noisy).float().mean().item()
    expected = 0.3 * (1 - 1 / 5)
    assert abs(changed - expected) < 4 * (expected * (1 - expected) / 2000) ** 0.5
    assert noisy.info["label_noise"] == 0.3 and clean.info["label_noise"] == 0.0


def test_separation_scales_the_class_means():
    near = synthetic_domains(3, 50, 6, 4, seed=1, noise=0.0, degrees_per_domain=0.0)
    far = synthetic_domains(3, 50, 6, 4, seed=1, noise=0.0, degrees_per_domain=0.0, separation=2.5)
    for (x, y), (x_far, y_far) in zip(near.domains, far.domains):
        assert torch.equal(y, y_far) and torch.allclose(x_far, 2.5 * x)


@pytest.mark.parametrize("bad", [{"separation": 0.0}, {"label_noise": 1.5}, {"label_noise": -0.1}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="separation > 0 and label_noise in"):
        synthetic_domains(**bad)


def test_the_command_lines_data_set_is_synthetic_domains_with_its_options():
    data = synthetic_dataset(per_domain=30, seed=2)
    reference = synthetic_domains(per_domain=30, seed=2, **SYNTHETIC_DATASET)
    assert all(torch.equal(a, b) for d, r in zip(data.domains, reference.domains) for a, b in zip(d, r))


def test_losses_differ_on_the_command_lines_data_set():
    """Short inner trainings on the data `--dataset synthetic` loads: no loss reaches 100% held
    out (on synthetic_domains' defaults every one did), and the losses do not all tie."""
    data = synthetic_dataset(per_domain=150, seed=0)
    losses = {"CE": ZOO["CE"], "LS": ZOO["LS"], "Focal": ZOO["Focal"],
              "ITL": TaylorLoss(ITL_PARAMETERS, 4, backend="torch")}
    records = evaluate_losses(data, losses, [0], Protocol(inner_steps=(150,), hidden=(32,), eval_size=100))
    held_out = {name: sum(r["heldout_acc"] for r in records if r["loss"] == name) / len(data.domains)
                for name in losses}
    assert max(held_out.values()) < 0.99, held_out
    assert len({round(acc, 3) for acc in held_out.values()}) > 1, held_out
