"""ITL inside other DG algorithms (RSC, CORAL, SagNet, Mixup, Fish), in process, on Debug28 on the CPU.

Each base's every cross-entropy call must become a call of our loss during `update`, and
DomainBed's module must get its `F` back afterwards, also when the update fails.
"""

import json

import pytest
import torch

from conftest import CountingLoss

from domainbed_itl.bridge.algorithms import LOSS_ALGORITHMS

OTHERS = {"RSC_ITL": "RSC", "CORAL_ITL": "CORAL", "SagNet_ITL": "SagNet", "Mixup_ITL": "Mixup",
          "Fish_ITL": "Fish"}


@pytest.fixture
def real_cross_entropy(monkeypatch):
    """Counts the calls of torch's own cross_entropy (what DomainBed's `F.cross_entropy` is)."""
    counter = {"calls": 0}
    original = torch.nn.functional.cross_entropy

    def counting(*args, **kwargs):
        counter["calls"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", counting)
    return counter


def _setup(domainbed, name, n_envs=2, batch_size=8):
    algorithms, datasets, hparams_registry = domainbed
    hparams = hparams_registry.default_hparams(name, "Debug28")
    dataset = datasets.Debug28("", [], hparams)
    minibatches = [(torch.stack([env[i][0] for i in range(batch_size)]),
                    torch.tensor([int(env[i][1]) for i in range(batch_size)]))
                   for env in list(dataset)[:n_envs]]
    torch.manual_seed(0)
    algorithm = algorithms.get_algorithm_class(name)(
        dataset.input_shape, dataset.num_classes, len(dataset) - 1, hparams)
    return algorithm, minibatches, dataset.num_classes


def test_the_specs_are_itl_inside_these_bases():
    others = {name: spec for name, spec in LOSS_ALGORITHMS.items() if spec.base != "ERM"}
    assert {name: spec.base for name, spec in others.items()} == OTHERS
    assert all(spec.loss == "ITL" for spec in others.values())


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_update_uses_our_loss_for_every_cross_entropy_of_the_base(domainbed, real_cross_entropy, name):
    algorithms = domainbed[0]
    base, minibatches, _ = _setup(domainbed, OTHERS[name])
    for _ in range(2):
        base.update(minibatches)
    base_calls = real_cross_entropy["calls"]
    assert base_calls > 0, "the spy on cross-entropy sees nothing; it could not catch a leak"

    real_cross_entropy["calls"] = 0
    algorithm, minibatches, num_classes = _setup(domainbed, name)
    assert isinstance(algorithm, algorithms.get_algorithm_class(OTHERS[name]))
    algorithm.supervised_loss = spy = CountingLoss(algorithm.supervised_loss)
    before = [p.detach().clone() for p in algorithm.parameters()]
    for _ in range(2):
        result = algorithm.update(minibatches)
        assert isinstance(result, dict) and result
        assert all(type(v) is float for v in result.values()), result
        assert algorithms.F is torch.nn.functional, "F was not restored after update"
    assert real_cross_entropy["calls"] == 0, "the base's cross-entropy was called"
    assert spy.calls == base_calls, "not every cross-entropy call of the base became our loss"
    assert any(not torch.equal(b, p) for b, p in zip(before, algorithm.parameters())), "no training"
    assert algorithm.predict(minibatches[0][0]).shape == (8, num_classes)


def test_f_is_restored_when_the_loss_fails(domainbed):
    algorithms = domainbed[0]
    algorithm, minibatches, _ = _setup(domainbed, "RSC_ITL")

    class Failing(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise ArithmeticError("loss failed")

    algorithm.supervised_loss = Failing()
    with pytest.raises(ArithmeticError, match="loss failed"):
        algorithm.update(minibatches)
    assert algorithms.F is torch.nn.functional


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_hparams_are_the_base_ones_plus_itl_loss(domainbed, name):
    hparams_registry = domainbed[2]
    base = OTHERS[name]
    for dataset in ("Debug28", "PACS"):
        assert hparams_registry.default_hparams(name, dataset) == {
            **hparams_registry.default_hparams(base, dataset), "itl_loss": "ITL"}
        for seed in (1, 5):
            drawn = hparams_registry.random_hparams(name, dataset, seed)
            assert drawn == {**hparams_registry.random_hparams(base, dataset, seed), "itl_loss": "ITL"}
            json.dumps(drawn)
