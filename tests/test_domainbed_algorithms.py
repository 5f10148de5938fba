"""ITL and the robust-loss algorithms inside DomainBed, in process, on Debug28 on the CPU."""

import json

import pytest
import torch
from conftest import CountingLoss

from domainbed_itl.algorithms import ALGORITHM_SPECS
from domainbed_itl.hparams import LOSS_HPARAMS
from domainbed_itl.losses import PRESETS, LossFileError, LossSpec, TaylorLoss, save_loss

ERM_BASED = [name for name, spec in ALGORITHM_SPECS.items() if spec.base == "ERM"]


def _minibatches(datasets, hparams, n_envs=2, batch_size=8):
    dataset = datasets.Debug28("", [], hparams)
    return [(torch.stack([env[i][0] for i in range(batch_size)]),
             torch.tensor([int(env[i][1]) for i in range(batch_size)]))
            for env in list(dataset)[:n_envs]], dataset


def test_register_is_idempotent(domainbed):
    import domainbed_itl

    algorithms, _, hparams_registry = domainbed
    before = list(algorithms.ALGORITHMS)
    wrapped = hparams_registry._hparams
    classes = {name: algorithms.get_algorithm_class(name) for name in ALGORITHM_SPECS}
    domainbed_itl.register()
    assert algorithms.ALGORITHMS == before
    assert hparams_registry._hparams is wrapped
    assert all(algorithms.get_algorithm_class(n) is c for n, c in classes.items())
    assert all(before.count(name) == 1 for name in ALGORITHM_SPECS)


@pytest.mark.parametrize("name", sorted(ALGORITHM_SPECS))
def test_hparams_extend_the_base(domainbed, name):
    _, _, hparams_registry = domainbed
    spec = ALGORITHM_SPECS[name]
    for dataset in ("RotatedMNIST", "PACS"):
        base = hparams_registry.default_hparams(spec.base, dataset)
        ours = hparams_registry.default_hparams(name, dataset)
        extra = {n: default for n, default, _ in LOSS_HPARAMS[spec.loss]}
        assert ours == {**base, **extra}
        # Same hparams seed, same base draws: ITL and its base are compared at equal settings.
        r_base = hparams_registry.random_hparams(spec.base, dataset, 7)
        r_ours = hparams_registry.random_hparams(name, dataset, 7)
        assert {k: r_ours[k] for k in r_base} == r_base
        assert r_ours == hparams_registry.random_hparams(name, dataset, 7)
        json.dumps(r_ours)  # results.jsonl stores hparams as JSON


def test_random_search_draws_loss_hparams_in_range(domainbed):
    _, _, hparams_registry = domainbed
    gammas = {hparams_registry.random_hparams("ERM_Focal", "PACS", s)["focal_gamma"] for s in range(20)}
    assert len(gammas) > 1 and gammas <= {0.5, 1.0, 2.0, 3.0, 5.0}
    qs = [hparams_registry.random_hparams("ERM_GCE", "PACS", s)["gce_q"] for s in range(20)]
    assert all(0.4 <= q <= 0.9 for q in qs)


@pytest.mark.parametrize("name", ERM_BASED)
def test_init_update_predict_on_cpu(domainbed, name):
    algorithms, datasets, hparams_registry = domainbed
    hparams = hparams_registry.default_hparams(name, "Debug28")
    minibatches, dataset = _minibatches(datasets, hparams)
    algorithm = algorithms.get_algorithm_class(name)(
        dataset.input_shape, dataset.num_classes, len(dataset) - 1, hparams)
    algorithm.supervised_loss = spy = CountingLoss(algorithm.supervised_loss)
    for _ in range(2):
        result = algorithm.update(minibatches)
        assert set(result) == {"loss"} and all(type(v) is float for v in result.values())
    assert spy.calls == 2, "the replaced loss was not used"
    assert algorithms.F is torch.nn.functional, "F was not restored after update"
    assert algorithm.predict(minibatches[0][0]).shape == (8, dataset.num_classes)


def test_itl_reports_its_own_loss_value(domainbed):
    algorithms, datasets, hparams_registry = domainbed
    hparams = hparams_registry.default_hparams("ITL", "Debug28")
    minibatches, dataset = _minibatches(datasets, hparams)
    algorithm = algorithms.get_algorithm_class("ITL")(dataset.input_shape, dataset.num_classes, 2, hparams)
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    with torch.no_grad():
        expected = TaylorLoss()(algorithm.predict(x), y).item()
    assert algorithm.update(minibatches)["loss"] == pytest.approx(expected, rel=1e-5)


def test_itl_loss_hparam_reads_a_loss_file(domainbed, tmp_path):
    algorithms, datasets, hparams_registry = domainbed
    path = save_loss(tmp_path / "order2.json", LossSpec("taylor", 2, [1.0, 0.0, 0.0, 0.0, 10.0]))
    hparams = {**hparams_registry.default_hparams("ITL", "Debug28"), "itl_loss": str(path)}
    _, dataset = _minibatches(datasets, hparams)
    algorithm = algorithms.get_algorithm_class("ITL")(dataset.input_shape, dataset.num_classes, 2, hparams)
    assert algorithm.supervised_loss.order == 2
    assert algorithm.supervised_loss.omega.tolist() == [1.0, 0.0, 0.0, 0.0, 10.0]

    bad = {**hparams, "itl_loss": str(tmp_path / "typo.json")}
    with pytest.raises(LossFileError, match="typo.json"):
        algorithms.get_algorithm_class("ITL")(dataset.input_shape, dataset.num_classes, 2, bad)


def test_itl_is_the_table_8_preset_by_default(domainbed):
    algorithms, datasets, hparams_registry = domainbed
    hparams = hparams_registry.default_hparams("ITL", "Debug28")
    _, dataset = _minibatches(datasets, hparams)
    algorithm = algorithms.get_algorithm_class("ITL")(dataset.input_shape, dataset.num_classes, 2, hparams)
    assert algorithm.supervised_loss.omega.tolist() == pytest.approx(PRESETS["ITL"].parameters)


def test_replaced_cross_entropy_rejects_unsupported_arguments(domainbed):
    from domainbed_itl.algorithms import supervised_loss

    algorithms, _, _ = domainbed
    with supervised_loss("domainbed.algorithms", TaylorLoss()):
        with pytest.raises(TypeError, match="label_smoothing"):
            algorithms.F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=0.1)
    assert algorithms.F is torch.nn.functional
