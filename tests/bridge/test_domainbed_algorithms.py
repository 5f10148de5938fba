"""ITL and the robust-loss algorithms inside DomainBed, in process, on the CPU.

The `bridge` fixture is the real DomainBed when DOMAINBED_ROOT is set, else the stand-in under
tests/domainbed_standin (as in CI): these tests check our side of the bridge either way.
"""

import json

import pytest
import torch
from conftest import CountingLoss

from domainbed_itl.bridge.algorithms import (LOSS_ALGORITHMS, LOSSES, LossHparamError, NonFiniteTrainingError,
                                             check_loss_hparams)
from domainbed_itl.losses import (LOSS_PRESETS, LossSpec, TaylorLoss, cpu_kernel, cross_entropy_taylor_init,
                                  save_loss)

ERM_BASED = [name for name, spec in LOSS_ALGORITHMS.items() if spec.base == "ERM"]
INPUT_SHAPE, NUM_CLASSES = (3, 28, 28), 2  # DomainBed's Debug28


def _minibatches(n_envs=2, batch_size=8):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, *INPUT_SHAPE, generator=generator),
             torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator))
            for _ in range(n_envs)]


def _algorithm(bridge, name, hparams=None):
    hparams = hparams or bridge.hparams_registry.default_hparams(name, "Debug28")
    return bridge.algorithms.get_algorithm_class(name)(INPUT_SHAPE, NUM_CLASSES, 2, hparams)


def _base_of(bridge, name):
    base = LOSS_ALGORITHMS[name].base
    if base not in bridge.algorithms.ALGORITHMS:
        pytest.skip(f"the DomainBed stand-in has no {base}; DOMAINBED_ROOT runs this test")
    return base


def test_every_algorithm_is_one_loss_inside_one_base():
    assert set(LOSS_ALGORITHMS) == {n for loss in LOSSES.values() for n in loss.algorithms}
    assert {s.loss for s in LOSS_ALGORITHMS.values()} == set(LOSSES)
    assert LOSS_ALGORITHMS["ITL"].base == "ERM" and LOSS_ALGORITHMS["RSC_ITL"].base == "RSC"
    hparams = [h[0] for loss in LOSSES.values() for h in loss.hparams]
    assert len(hparams) == len(set(hparams)), "two losses define the same hparam"


def test_register_is_idempotent(bridge):
    import domainbed_itl

    algorithms, hparams_registry = bridge.algorithms, bridge.hparams_registry
    before = list(algorithms.ALGORITHMS)
    wrapped = hparams_registry._hparams
    ours = [name for name in LOSS_ALGORITHMS if name in before]
    assert set(ERM_BASED) <= set(ours)
    classes = {name: algorithms.get_algorithm_class(name) for name in ours}
    domainbed_itl.register()
    assert algorithms.ALGORITHMS == before
    assert hparams_registry._hparams is wrapped
    assert all(algorithms.get_algorithm_class(n) is c for n, c in classes.items())
    assert all(before.count(name) == 1 for name in ours)


def test_an_algorithm_whose_base_is_missing_is_left_out():
    from domainbed_itl.bridge.registration import register_algorithms

    class ERM:
        pass

    namespace = {"ALGORITHMS": ["ERM"], "ERM": ERM}
    added = register_algorithms(namespace)
    assert set(added) == set(ERM_BASED) and namespace["ALGORITHMS"] == ["ERM", *ERM_BASED]
    assert "RSC_ITL" not in namespace and issubclass(namespace["ITL"], ERM)


@pytest.mark.parametrize("name", sorted(LOSS_ALGORITHMS))
def test_hparams_extend_the_base(bridge, name):
    base = _base_of(bridge, name)
    hparams_registry = bridge.hparams_registry
    for dataset in ("RotatedMNIST", "PACS"):
        base_hparams = hparams_registry.default_hparams(base, dataset)
        ours = hparams_registry.default_hparams(name, dataset)
        extra = {n: default for n, default, _ in LOSSES[LOSS_ALGORITHMS[name].loss].hparams}
        assert ours == {**base_hparams, **extra}
        # Same hparams seed, same base draws: ITL and its base are compared at equal settings.
        r_base = hparams_registry.random_hparams(base, dataset, 7)
        r_ours = hparams_registry.random_hparams(name, dataset, 7)
        assert {k: r_ours[k] for k in r_base} == r_base
        assert r_ours == hparams_registry.random_hparams(name, dataset, 7)
        json.dumps(r_ours)  # results.jsonl stores hparams as JSON


def test_loss_hparams_are_drawn_with_domainbeds_seed_hash(bridge):
    import numpy as np
    from domainbed.lib import misc

    drawn = bridge.hparams_registry.random_hparams("ERM_GCE", "PACS", 11)["gce_q"]
    (_, _, draw), = LOSSES["GCE"].hparams
    assert drawn == draw(np.random.RandomState(misc.seed_hash(11, "gce_q")))


def test_random_search_draws_loss_hparams_in_range(bridge):
    hparams_registry = bridge.hparams_registry
    gammas = {hparams_registry.random_hparams("ERM_Focal", "PACS", s)["focal_gamma"] for s in range(20)}
    assert len(gammas) > 1 and gammas <= {0.5, 1.0, 2.0, 3.0, 5.0}
    qs = [hparams_registry.random_hparams("ERM_GCE", "PACS", s)["gce_q"] for s in range(20)]
    assert all(0.4 <= q <= 0.9 for q in qs)
    epsilons = [hparams_registry.random_hparams("ERM_Poly1", "PACS", s)["poly_epsilon"] for s in range(20)]
    assert all(-1 <= e <= 3 for e in epsilons) and min(epsilons) < 0 < 2 < max(epsilons)


@pytest.mark.parametrize("name", ERM_BASED)
def test_init_update_predict_on_cpu(bridge, name):
    algorithm = _algorithm(bridge, name)
    minibatches = _minibatches()
    algorithm.supervised_loss = spy = CountingLoss(algorithm.supervised_loss)
    for _ in range(2):
        result = algorithm.update(minibatches)
        assert set(result) == {"loss"} and all(type(v) is float for v in result.values())
    assert spy.calls == 2, "the replaced loss was not used"
    assert bridge.algorithms.F is torch.nn.functional, "F was not restored after update"
    assert algorithm.predict(minibatches[0][0]).shape == (8, NUM_CLASSES)


def test_itl_reports_its_own_loss_value(bridge):
    algorithm = _algorithm(bridge, "ITL")
    minibatches = _minibatches()
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    with torch.no_grad():
        expected = TaylorLoss()(algorithm.predict(x), y).item()
    assert algorithm.update(minibatches)["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("preset", [name for name in LOSS_PRESETS if name != "ITL"])
def test_itl_trains_with_a_shipped_learned_loss(bridge, preset):
    """A learned preset as itl_loss: the algorithm holds its ω, reports its value on the batch
    and moves the network."""
    spec = LOSS_PRESETS[preset]
    hparams = {**bridge.hparams_registry.default_hparams("ITL", "Debug28"), "itl_loss": preset}
    algorithm = _algorithm(bridge, "ITL", hparams)
    assert algorithm.supervised_loss.omega.tolist() == spec.parameters
    minibatches = _minibatches()
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    with torch.no_grad():
        before = algorithm.predict(x)
        expected = spec.module()(before, y).item()
    assert algorithm.update(minibatches)["loss"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        assert not torch.equal(algorithm.predict(x), before)


def test_the_constructors_loss_check_never_loads_the_cpu_kernel(bridge, monkeypatch):
    """With DOMAINBED_ITL_CPU_KERNEL=1 inherited, a GPU job's constructor must not build the C++
    kernel (about 30 s, or forever on a stale build lock) to check its loss on CPU logits; a CPU
    job still opts in when it trains."""
    calls = []

    def load():
        calls.append(len(calls))  # None: "auto" falls back to the torch ops

    monkeypatch.setenv(cpu_kernel.ENV, "1")
    monkeypatch.setattr(cpu_kernel, "load", load)
    algorithm = _algorithm(bridge, "ITL")
    check_loss_hparams("ITL", {"itl_loss": "ITL"}, NUM_CLASSES)
    assert calls == [], "the loss check loaded (or built) the C++ kernel"
    algorithm.update(_minibatches())
    assert calls, "CPU training no longer opts in to the kernel"


def test_itl_loss_hparam_reads_a_loss_file(bridge, tmp_path):
    path = save_loss(tmp_path / "order2.json", LossSpec("taylor", 2, [1.0, 0.0, 0.0, 0.0, 10.0]))
    hparams = {**bridge.hparams_registry.default_hparams("ITL", "Debug28"), "itl_loss": str(path)}
    algorithm = _algorithm(bridge, "ITL", hparams)
    assert algorithm.supervised_loss.order == 2
    assert algorithm.supervised_loss.omega.tolist() == [1.0, 0.0, 0.0, 0.0, 10.0]

    bad = {**hparams, "itl_loss": str(tmp_path / "typo.json")}
    with pytest.raises(LossHparamError, match="algorithm ITL: hparam itl_loss='.*typo.json' is "
                                              "neither a preset loss nor an existing file"):
        _algorithm(bridge, "ITL", bad)


def _loss_file(tmp_path, name, family, order, parameters):
    """A loss file written as a user could, bypassing LossSpec's checks."""
    path = tmp_path / name
    path.write_text(json.dumps({"format": "domainbed-itl-loss", "version": 1, "family": family,
                                "order": order, "parameters": parameters}))
    return str(path)


@pytest.mark.parametrize("name, hparam, value, message", [
    ("ERM_Focal", "focal_gamma", -1.0, r"hparam focal_gamma=-1.0: expected a number >= 0"),
    ("ERM_Focal", "focal_gamma", "2", r"hparam focal_gamma='2': expected a number >= 0"),
    ("ERM_SCE", "sce_alpha", -0.1, r"hparams sce_alpha and sce_beta: SCE weights alpha=-0.1, "
                                   r"beta=1.0: expected both >= 0"),
    ("ERM_SCE", "sce_beta", float("nan"), r"hparam sce_beta=nan: expected a finite number"),
    ("ERM_GCE", "gce_q", 0.0, r"hparam gce_q=0.0: expected a number in \(0, 1\]"),
    ("ERM_LS", "ls_epsilon", 1.0, r"hparam ls_epsilon=1.0: expected a number in \[0, 1\)"),
    ("ERM_Poly1", "poly_epsilon", -1.5, r"hparam poly_epsilon=-1.5: expected a number >= -1"),
    ("ERM_Poly1", "poly_epsilon", float("inf"), r"hparam poly_epsilon=inf: expected a number >= -1"),
    ("ITL", "itl_loss", 3,
     r"hparam itl_loss=3: expected a preset loss \(ITL, learned-RotatedMNIST, "
     r"stationary-RotatedMNIST, composite-RotatedMNIST\) or the path"),
    ("ITL", "itl_loss", "absurd", r"the ITL loss of hparams itl_loss='.*absurd.json' is not finite"),
    ("ITL", "itl_loss", "upside_down", r"the ITL loss of hparams itl_loss='.*upside_down.json' "
                                       r"would be maximised"),
    ("ITL", "itl_loss", "negative_sce", r"hparam itl_loss='.*negative_sce.json': SCE weights "
                                        r"alpha=-1.0"),
])
def test_bad_loss_hparams_are_refused_by_the_constructor(bridge, tmp_path, name, hparam, value,
                                                         message):
    files = {"absurd": ("taylor", 4, [1e30] * 12),
             # the Taylor expansion of cross-entropy with the wrong sign: +log p, maximised
             "upside_down": ("taylor", 4, [v if i < 2 else -v for i, v in
                                           enumerate(cross_entropy_taylor_init(4, NUM_CLASSES))]),
             "negative_sce": ("sce", None, [-1.0, 1.0])}
    if value in files:
        value = _loss_file(tmp_path, f"{value}.json", *files[value])
    hparams = {**bridge.hparams_registry.default_hparams(name, "Debug28"), hparam: value}
    with pytest.raises(LossHparamError, match=f"algorithm {name}: {message}"):
        _algorithm(bridge, name, hparams)


def test_a_non_finite_training_step_stops_the_run(bridge):
    algorithm = _algorithm(bridge, "ITL")
    minibatches = _minibatches()
    assert all(v == v for v in algorithm.update(minibatches).values())
    poisoned = [(torch.full_like(x, float("nan")), y) for x, y in minibatches]
    with pytest.raises(NonFiniteTrainingError, match=r"algorithm ITL: update 2 returned loss = nan; "
                                                     r"stopping instead of training on non-finite "
                                                     r"values \(itl_loss='ITL'\)"):
        algorithm.update(poisoned)


@pytest.mark.parametrize("epsilon", [2.0, -1.0])
def test_poly1_trains_with_ce_plus_epsilon_times_one_minus_p(bridge, epsilon):
    hparams = {**bridge.hparams_registry.default_hparams("ERM_Poly1", "Debug28"), "poly_epsilon": epsilon}
    algorithm = _algorithm(bridge, "ERM_Poly1", hparams)
    minibatches = _minibatches()
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    with torch.no_grad():
        p = algorithm.predict(x).softmax(1).gather(1, y.unsqueeze(1)).squeeze(1)
    expected = (-p.log() + epsilon * (1 - p)).mean().item()  # Leng et al.'s Poly-1
    assert algorithm.update(minibatches)["loss"] == pytest.approx(expected, rel=1e-5)


def test_itl_is_the_table_8_preset_by_default(bridge):
    algorithm = _algorithm(bridge, "ITL")
    assert algorithm.supervised_loss.omega.tolist() == pytest.approx(LOSS_PRESETS["ITL"].parameters)


@pytest.mark.parametrize("name, attribute, expected", [
    ("ERM_Focal", "gamma", 2.0), ("ERM_GCE", "q", 0.7), ("ERM_LS", "epsilon", 0.1),
    ("ERM_Poly1", "epsilon", 2.0)])
def test_zoo_losses_take_their_hparams(bridge, name, attribute, expected):
    loss = _algorithm(bridge, name).supervised_loss
    assert loss.keywords == {attribute: expected}


def test_replaced_cross_entropy_rejects_unsupported_arguments(bridge):
    from domainbed_itl.bridge.algorithms import supervised_loss

    with supervised_loss("domainbed.algorithms", TaylorLoss()):
        with pytest.raises(TypeError, match="label_smoothing"):
            bridge.algorithms.F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]),
                                              label_smoothing=0.1)
    assert bridge.algorithms.F is torch.nn.functional


def test_sweep_planning_checks_the_losses_for_the_datasets_classes(tmp_path):
    from domainbed_itl.bridge.hparams import check_sweep_losses
    from domainbed_itl.datasets import DATASETS

    ours = [name for name in LOSS_ALGORITHMS]
    check_sweep_losses(ours + ["ERM", "Unknown"], list(DATASETS), {})  # defaults all train
    upside = _loss_file(tmp_path, "upside_down.json", "taylor", 4,
                        [v if i < 2 else -v for i, v in enumerate(cross_entropy_taylor_init(4, 10))])
    with pytest.raises(ValueError, match=r"^--hparams: algorithm ITL: the ITL loss of hparams itl_loss="
                                         r".* would be maximised.*\(dataset RotatedMNIST\)$"):
        check_sweep_losses(["ERM", "ITL"], ["RotatedMNIST"], {"itl_loss": upside})
    # A dataset of unknown class count leaves that check to the algorithm's constructor...
    check_sweep_losses(["ITL"], ["MyImages"], {"itl_loss": upside})
    # ...but not the others.
    with pytest.raises(ValueError, match="hparam focal_gamma=-0.5: expected a number >= 0"):
        check_sweep_losses(["ERM_Focal"], ["MyImages"], {"focal_gamma": -0.5})
    check_sweep_losses(["ERM"], ["RotatedMNIST"], {"itl_loss": upside})  # not one of ours: ignored


@pytest.mark.slow
def test_dataset_classes_match_domainbed(domainbed, mnist10k):
    from domainbed_itl.datasets import DATASETS

    _, datasets, _ = domainbed
    for name in ("Debug28", "Debug224", "ColoredMNIST", "RotatedMNIST"):
        dataset = datasets.get_dataset_class(name)(str(mnist10k), [0], {"data_augmentation": False})
        assert dataset.num_classes == DATASETS[name].classes, name
