"""DomainBed's own loaders as the meta-learner's flat domains (bridge/domainbed_data.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.domainbed
def test_domainbed_loaders_give_flat_domains(domainbed_root, mnist10k):
    from domainbed_itl.bridge.domainbed_data import load_domainbed_domains

    rotated = load_domainbed_domains("RotatedMNIST", mnist10k, domainbed_root, per_domain_cap=50)
    assert rotated.environments == ["0", "15", "30", "45", "60", "75"]
    assert [tuple(x.shape) for x, _ in rotated.domains] == [(50, 784)] * 6
    assert rotated.num_classes == 10 and rotated.domains[0][1].dtype == torch.int64
    again = load_domainbed_domains("RotatedMNIST", mnist10k, domainbed_root, per_domain_cap=50)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rotated.domains, again.domains))
    colored = load_domainbed_domains("ColoredMNIST", mnist10k, domainbed_root, per_domain_cap=40)
    assert [tuple(x.shape) for x, _ in colored.domains] == [(40, 1568)] * 3
    assert colored.num_classes == 2
    with pytest.raises(ValueError, match="unknown DomainBed dataset 'MNISTX'"):
        load_domainbed_domains("MNISTX", mnist10k, domainbed_root)
