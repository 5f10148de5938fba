"""The planted task: training labels with symmetric noise, held-out domains judged on clean labels,
and the plumbing that keeps the two apart in meta-training and in the meta evaluation."""

import pytest
import torch

from domainbed_itl.losses.zoo import ZOO
from domainbed_itl.meta import MetaConfig, MetaTrainer
from domainbed_itl.meta.data import (PLANTED_DATASET, DomainData, planted_dataset, planted_domains,
                                     symmetric_label_noise, synthetic_domains)
from domainbed_itl.meta.evaluate import Protocol, evaluate_losses
from domainbed_itl.meta.runner import data_fingerprint
from domainbed_itl.scripts._cli import load_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_symmetric_label_noise_redraws_a_share_of_the_labels_uniformly():
    y = torch.zeros(20000, dtype=torch.long)
    noisy = symmetric_label_noise(y, 4, 0.6, seed=5)
    counts = torch.bincount(noisy, minlength=4).float() / len(y)
    expected = torch.tensor([0.4 + 0.6 / 4] + [0.6 / 4] * 3)
    assert torch.allclose(counts, expected, atol=0.015), counts
    assert torch.equal(noisy, symmetric_label_noise(y, 4, 0.6, seed=5))
    assert torch.equal(symmetric_label_noise(y, 4, 0.0, seed=5), y) and y.max() == 0


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_a_bad_noise_rate_is_refused(rate):
    with pytest.raises(ValueError, match=r"label noise rate must lie in \[0, 1\], got"):
        symmetric_label_noise(torch.zeros(3, dtype=torch.long), 2, rate, seed=0)


def test_planted_domains_train_on_noisy_labels_and_hold_out_clean_ones():
    data = planted_domains(per_domain=500, seed=1)
    clean = synthetic_domains(4, 500, 32, 4, seed=1, degrees_per_domain=10.0, separation=1.0)
    for (x, y), held, (x_clean, y_clean) in zip(data.domains, data.heldout_labels, clean.domains):
        assert torch.equal(x, x_clean) and torch.equal(held, y_clean)
        wrong = (y != y_clean).float().mean().item()
        assert abs(wrong - 0.6 * 3 / 4) < 0.07, wrong
    assert data.heldout_targets() == data.heldout_labels
    assert clean.heldout_targets()[0] is clean.domains[0][1]
    assert data.info["training_label_noise"] == PLANTED_DATASET["training_label_noise"]


def test_the_command_lines_planted_data_set_is_planted_domains_with_its_options():
    flags = {"dataset": "planted", "per_domain_cap": None, "data_seed": 2}
    data, reference = load_data(flags), planted_domains(seed=2, **PLANTED_DATASET)
    assert all(torch.equal(a, b) for d, r in zip(data.domains, reference.domains) for a, b in zip(d, r))
    assert all(torch.equal(a, b) for a, b in zip(data.heldout_labels, reference.heldout_labels))
    assert len(planted_dataset(per_domain=30).domains[0][1]) == 30


def test_the_fingerprint_sees_the_held_out_labels():
    data = planted_domains(per_domain=40)
    shifted = DomainData(data.name, data.environments, data.domains, data.num_classes,
                         data.input_shape, heldout_labels=[(y + 1) % 4 for y in data.heldout_labels])
    assert data_fingerprint(data) != data_fingerprint(shifted)
    plain = DomainData(data.name, data.environments, data.domains, data.num_classes, data.input_shape)
    same = DomainData(data.name, data.environments, data.domains, data.num_classes, data.input_shape,
                      heldout_labels=None)
    assert data_fingerprint(plain) == data_fingerprint(same)


@pytest.mark.parametrize("labels, message", [
    (lambda d: d.heldout_labels[:2], "2 held-out label tensors for 4 domains"),
    (lambda d: [y[:-1] for y in d.heldout_labels], "y must be int64 class indices of shape"),
    (lambda d: [y + 4 for y in d.heldout_labels], r"labels must lie in \[0, 4\)")])
def test_bad_held_out_labels_are_refused_by_name(labels, message):
    data = planted_domains(per_domain=20)
    with pytest.raises(ValueError, match=message):
        DomainData(data.name, data.environments, data.domains, 4, data.input_shape,
                   heldout_labels=labels(data))


def _shifted(data: DomainData) -> DomainData:
    """`data` judged on labels that are never the clean ones."""
    return DomainData(data.name, data.environments, data.domains, data.num_classes, data.input_shape,
                      heldout_labels=[(y + 1) % data.num_classes for y in data.heldout_labels])


def test_meta_training_judges_the_held_out_domain_on_its_held_out_labels():
    """Same inner training whatever the held-out labels; M and accuracy follow them: labels never
    equal to the clean ones are predicted at most as often as the clean ones are missed."""
    data = planted_domains(per_domain=60)
    config = MetaConfig(inner_steps=30, hidden=(8,), eval_size=None, hvp_batch=32, inner_lr=0.1)
    records = {}
    for name, d in [("clean", data), ("shifted", _shifted(data))]:
        trainer = MetaTrainer(d.domains, 4, config, heldout_labels=d.heldout_labels)
        records[name] = trainer.heldout_objective(trainer.omega, step=1)
    clean, shifted = records["clean"], records["shifted"]
    assert clean["inner_loss"] == shifted["inner_loss"]
    assert clean["inner_source_acc"] == shifted["inner_source_acc"]
    assert clean["outer_heldout_loss"] != shifted["outer_heldout_loss"]
    for a, b in zip(clean["per_domain"]["heldout_acc"], shifted["per_domain"]["heldout_acc"]):
        assert b <= 1 - a + 1e-6
    with pytest.raises(ValueError, match="held-out labels of shape"):
        MetaTrainer(data.domains, 4, config, heldout_labels=[y[:-1] for y in data.heldout_labels])


def test_the_meta_evaluation_judges_the_held_out_domain_on_its_held_out_labels():
    data = planted_domains(per_domain=60)
    protocol = Protocol(inner_steps=(40,), hidden=(8,), eval_size=None, inner_lr=0.1)
    clean = evaluate_losses(data, {"CE": ZOO["CE"]}, [0], protocol)
    shifted = evaluate_losses(_shifted(data), {"CE": ZOO["CE"]}, [0], protocol)
    for a, b in zip(clean, shifted):
        assert a["source_acc"] == b["source_acc"] and a["final_train_loss"] == b["final_train_loss"]
        assert b["heldout_acc"] <= 1 - a["heldout_acc"] + 1e-6
    assert [r["heldout_ce"] for r in clean] != [r["heldout_ce"] for r in shifted]
