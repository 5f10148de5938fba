"""Single-source Mixup, and the one-domain behaviour of every algorithm of Table 4.

DomainBed's Mixup pairs the only minibatch of a single training domain with itself, so it is
cross-entropy; SingleSourceMixup mixes within the domain and is DomainBed's Mixup with two.
The other algorithms of Table 4 (ERM, CORAL, SagNet, ITL) are checked for the same degeneracy:
CORAL is ERM with one domain; ERM, ITL and SagNet never use the domain split at all.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domainbed_itl.bridge.single_source_mixup import NAME, mixup_pairs


def _batches(n_domains, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g))
            for _ in range(n_domains)]


def test_a_lone_minibatch_is_paired_with_a_shuffle_of_itself():
    (x, y), = _batches(1)
    torch.manual_seed(3)
    ((x1, y1), (x2, y2)), = mixup_pairs([(x, y)], pairs_across_domains=None)
    torch.manual_seed(3)
    perm = torch.randperm(len(x))
    assert x1 is x and y1 is y
    assert torch.equal(x2, x[perm]) and torch.equal(y2, y[perm])
    assert not torch.equal(perm, torch.arange(len(x))), "the seed gave the identity; pick another"
    # The mixed inputs differ from the originals, unlike DomainBed's pairing of x with itself.
    assert not torch.allclose(0.3 * x1 + 0.7 * x2, x1)


def test_several_minibatches_are_paired_by_the_given_function():
    batches = _batches(3)
    sentinel = [("pairs",)]
    calls = []

    def across(minibatches):
        calls.append(minibatches)
        return sentinel

    assert mixup_pairs(batches, across) is sentinel and calls == [batches]


def test_the_pairs_keep_the_device_and_the_labels_of_the_samples():
    (x, y), = _batches(1, n=50)
    ((_, _), (x2, y2)), = mixup_pairs([(x, y)], pairs_across_domains=None)
    assert x2.device == x.device
    # Each shuffled sample keeps its own label.
    for row, label in zip(x2, y2):
        (index,) = torch.nonzero((x == row).all(dim=1)).flatten().tolist()
        assert y[index] == label


# --- in DomainBed (Debug28, in process, CPU) ------------------------------------------------

def _debug28(datasets, n_envs, batch_size=8):
    dataset = datasets.Debug28("", [], {})
    return [(torch.stack([env[i][0] for i in range(batch_size)]),
             torch.tensor([int(env[i][1]) for i in range(batch_size)]))
            for env in list(dataset)[:n_envs]], dataset


def _make(domainbed, name, dataset, seed=0, hparams_of=None):
    algorithms, _, hparams_registry = domainbed
    hparams = hparams_registry.default_hparams(hparams_of or name, "Debug28")
    torch.manual_seed(seed)
    return algorithms.get_algorithm_class(name)(dataset.input_shape, dataset.num_classes, 1, hparams)


def _update(algorithm, minibatches, seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return algorithm.update(minibatches)


def _mid_lambda_seed(alpha):
    """A seed whose first Beta(alpha, alpha) draw is far from 0 and 1 (Beta(0.2, 0.2), DomainBed's
    default, puts most mass near the ends, where any mixup is nearly plain cross-entropy)."""
    for seed in range(1000):
        np.random.seed(seed)
        if 0.25 < np.random.beta(alpha, alpha) < 0.75:
            return seed
    raise AssertionError("no seed found")


def _params(algorithm):
    return [p.detach().clone() for p in algorithm.parameters()]


def test_registered_with_mixups_hparams(domainbed):
    algorithms, _, hparams_registry = domainbed
    cls = algorithms.get_algorithm_class(NAME)
    assert issubclass(cls, algorithms.Mixup) and NAME in algorithms.ALGORITHMS
    assert algorithms.ALGORITHMS.count(NAME) == 1
    for seed in (0, 5):
        assert (hparams_registry.random_hparams(NAME, "PACS", seed)
                == hparams_registry.random_hparams("Mixup", "PACS", seed))
    assert "mixup_alpha" in hparams_registry.default_hparams(NAME, "PACS")


def test_domainbed_mixup_with_one_domain_is_cross_entropy(domainbed):
    algorithms, datasets, _ = domainbed
    minibatches, dataset = _debug28(datasets, n_envs=1)
    mixup = _make(domainbed, "Mixup", dataset)
    (x, y), = minibatches
    with torch.no_grad():
        ce = F.cross_entropy(mixup.predict(x), y).item()
    for seed in range(3):
        before = _make(domainbed, "Mixup", dataset)
        assert _update(before, minibatches, seed)["loss"] == pytest.approx(ce, rel=1e-6)


def test_single_source_mixup_mixes_within_the_one_domain(domainbed):
    algorithms, datasets, _ = domainbed
    minibatches, dataset = _debug28(datasets, n_envs=1)
    (x, y), = minibatches
    ours = _make(domainbed, NAME, dataset)
    seed = _mid_lambda_seed(ours.hparams["mixup_alpha"])
    with torch.no_grad():
        ce = F.cross_entropy(ours.predict(x), y).item()
        # What Zhang et al.'s mixup computes with the draws that `update` will make.
        torch.manual_seed(seed)
        perm = torch.randperm(len(x))
        np.random.seed(seed)
        lam = np.random.beta(ours.hparams["mixup_alpha"], ours.hparams["mixup_alpha"])
        logits = ours.predict(lam * x + (1 - lam) * x[perm])
        expected = (lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])).item()
    loss = _update(ours, minibatches, seed)["loss"]
    assert loss == pytest.approx(expected, rel=1e-6)
    assert abs(loss - ce) > 1e-3, "single-source Mixup gave plain cross-entropy"
    assert algorithms.random_pairs_of_minibatches.__name__ == "random_pairs_of_minibatches", \
        "DomainBed's pairing function was not restored"


def test_single_source_mixup_with_two_domains_is_domainbeds_mixup(domainbed):
    algorithms, datasets, _ = domainbed
    minibatches, dataset = _debug28(datasets, n_envs=2)
    ours, theirs = _make(domainbed, NAME, dataset), _make(domainbed, "Mixup", dataset)
    assert all(torch.equal(a, b) for a, b in zip(_params(ours), _params(theirs)))
    for seed in range(3):
        assert _update(ours, minibatches, seed) == _update(theirs, minibatches, seed)
    assert all(torch.equal(a, b) for a, b in zip(_params(ours), _params(theirs)))
    # ...and the comparison can fail: with one domain the two differ.
    one, _ = _debug28(datasets, n_envs=1)
    seed = _mid_lambda_seed(ours.hparams["mixup_alpha"])
    assert _update(ours, one, seed)["loss"] != _update(theirs, one, seed)["loss"]


def test_coral_with_one_domain_is_erm(domainbed):
    _, datasets, _ = domainbed
    for n_envs, same in ((1, True), (2, False)):
        minibatches, dataset = _debug28(datasets, n_envs=n_envs)
        coral, erm = _make(domainbed, "CORAL", dataset), _make(domainbed, "ERM", dataset)
        for seed in range(3):
            result, erm_result = _update(coral, minibatches, seed), _update(erm, minibatches, seed)
            assert (result["penalty"] == 0) == same
            if same:
                assert result["loss"] == erm_result["loss"]
        assert all(torch.equal(a, b) for a, b in zip(_params(coral), _params(erm))) == same


@pytest.mark.parametrize("name", ["ERM", "ITL", "SagNet"])
def test_erm_itl_and_sagnet_never_use_the_domain_split(domainbed, name):
    """The update on two domains' minibatches equals the update on their concatenation as one
    domain: these algorithms see one pooled batch, so one source domain changes nothing in them."""
    _, datasets, _ = domainbed
    minibatches, dataset = _debug28(datasets, n_envs=2)
    pooled = [(torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches]))]
    split, one = _make(domainbed, name, dataset), _make(domainbed, name, dataset)
    for seed in range(2):
        assert _update(split, minibatches, seed) == _update(one, pooled, seed)
    assert all(torch.equal(a, b) for a, b in zip(_params(split), _params(one)))


def test_mixup_does_use_the_domain_split(domainbed):
    """The same comparison for DomainBed's Mixup fails: the check above can tell."""
    _, datasets, _ = domainbed
    minibatches, dataset = _debug28(datasets, n_envs=2)
    pooled = [(torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches]))]
    split, one = _make(domainbed, "Mixup", dataset), _make(domainbed, "Mixup", dataset)
    assert _update(split, minibatches, 0) != _update(one, pooled, 0)


def test_the_single_source_sweep_names_the_one_domain_cases(patched_domainbed, tmp_path):
    import subprocess
    import sys

    from conftest import domainbed_env

    result = subprocess.run(
        [sys.executable, "-m", "domainbed_itl.scripts.single_source_sweep", "launch", "--datasets", "Debug28",
         "--algorithms", "Mixup", "CORAL", NAME, "--n_hparams", "1", "--n_trials", "1", "--data_dir",
         str(tmp_path), "--output_dir", str(tmp_path / "out"), "--command_launcher", "dummy",
         "--skip_confirmation", "--domainbed_root", str(patched_domainbed)],
        capture_output=True, text=True, timeout=300, env=domainbed_env(patched_domainbed))
    assert result.returncode == 0, result.stderr
    assert "note: DomainBed's Mixup pairs the only source minibatch with itself" in result.stdout
    assert f"{NAME} mixes within the domain" in result.stdout
    assert "note: DomainBed's CORAL penalty sums over pairs of training domains" in result.stdout
    assert result.stdout.count(f"--algorithm {NAME}") == 3  # one job per Debug28 source domain
