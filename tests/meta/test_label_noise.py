"""Symmetric label noise: the exact rate, only other classes, determinism, and held-out domains
judged on clean labels by construction."""

from __future__ import annotations

import pytest
import torch

from domainbed_itl.meta.data import planted_dataset, synthetic_domains
from domainbed_itl.meta.noise import domain_generator, symmetric_label_noise, with_label_noise


def _labels(n=1000, classes=10, seed=0):
    return torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rate, n, expected", [(0.5, 1000, 500), (0.25, 10, 3), (0.0, 50, 0),
                                               (1.0, 50, 50), (0.333, 300, 100)])
def test_exactly_the_rounded_fraction_is_changed_each_to_another_class(rate, n, expected):
    y = _labels(n)
    noisy = symmetric_label_noise(y, rate, 10, torch.Generator().manual_seed(1))
    assert int((noisy != y).sum()) == expected
    assert noisy.dtype == torch.int64 and int(noisy.min()) >= 0 and int(noisy.max()) < 10
    assert torch.equal(y, _labels(n))  # the input is untouched


def test_the_new_classes_are_uniform_among_the_other_classes():
    y = torch.zeros(30000, dtype=torch.int64)
    noisy = symmetric_label_noise(y, 1.0, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(noisy, minlength=4)
    assert counts[0] == 0
    assert ((counts[1:].float() / 30000 - 1 / 3).abs() < 0.01).all()


def test_noise_is_deterministic_in_the_generator():
    y = _labels()
    first = symmetric_label_noise(y, 0.3, 10, torch.Generator().manual_seed(7))
    assert torch.equal(first, symmetric_label_noise(y, 0.3, 10, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, symmetric_label_noise(y, 0.3, 10, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("call, message", [
    (lambda y: symmetric_label_noise(y, 1.5, 10, torch.Generator()),
     r"rate must be a number in \[0, 1\], got 1.5"),
    (lambda y: symmetric_label_noise(y, True, 10, torch.Generator()), r"got True"),
    (lambda y: symmetric_label_noise(y, 0.1, 1, torch.Generator()), r"num_classes >= 2, got 1"),
    (lambda y: symmetric_label_noise(y.float(), 0.1, 10, torch.Generator()), r"int64 of shape \(n,\)"),
    (lambda y: symmetric_label_noise(y, 0.1, 5, torch.Generator()), r"lie in \[0, 5\), got \[0, 9\]"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(_labels())


def test_source_domains_get_noise_and_held_out_labels_stay_clean():
    data = synthetic_domains(num_domains=4, per_domain=200, features=8, num_classes=5, seed=0)
    clean = [y.clone() for _, y in data.domains]
    noisy = with_label_noise(data, 0.4, seed=3)
    for k, ((x, y), target) in enumerate(zip(noisy.domains, noisy.heldout_targets())):
        assert torch.equal(target, clean[k])  # judged on clean labels when held out
        assert int((y != clean[k]).sum()) == 80
        assert x is data.domains[k][0]
    assert all(torch.equal(y, c) for (_, y), c in zip(data.domains, clean))  # data unchanged
    assert noisy.info["training_label_noise"] == 0.4
    assert noisy.info["training_label_noise_domains"] == [0, 1, 2, 3]


def test_chosen_domains_only_and_a_domains_noise_ignores_the_others():
    data = synthetic_domains(num_domains=4, per_domain=100, features=8, num_classes=5, seed=0)
    some = with_label_noise(data, 0.5, seed=1, domains=[1, 3])
    every = with_label_noise(data, 0.5, seed=1)
    assert torch.equal(some.domains[0][1], data.domains[0][1])
    assert torch.equal(some.domains[3][1], every.domains[3][1])
    assert torch.equal(some.domains[1][1],
                       symmetric_label_noise(data.domains[1][1], 0.5, 5, domain_generator(1, 1)))
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 4\), got \[1, 4\]"):
        with_label_noise(data, 0.5, domains=[1, 4])


def test_a_data_set_with_its_own_held_out_labels_keeps_them():
    planted = planted_dataset(per_domain=50)
    noisier = with_label_noise(planted, 0.2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(noisier.heldout_targets(), planted.heldout_labels))
