"""PCGrad aggregation of per-domain hypergradients (Yu et al., 2020) and the plain mean."""

from __future__ import annotations

import pytest
import torch

from domainbed_itl.meta.aggregators import mean, pcgrad


def _reference_pcgrad(grads: torch.Tensor, seed: int, reduction: str = "mean") -> torch.Tensor:
    """Yu et al.'s Algorithm 1 written out with Python floats, same random orders."""
    g = torch.Generator().manual_seed(seed)
    rows = [r.tolist() for r in grads]
    out = []
    for i, gi in enumerate(rows):
        pc = list(gi)
        for j in torch.randperm(len(rows), generator=g).tolist():
            if j == i:
                continue
            dot = sum(a * b for a, b in zip(pc, rows[j]))
            if dot < 0:
                norm2 = sum(b * b for b in rows[j])
                pc = [a - dot / norm2 * b for a, b in zip(pc, rows[j])]
        out.append(pc)
    out = torch.tensor(out, dtype=torch.float64)
    return out.sum(0) if reduction == "sum" else out.mean(0)


def test_conflicting_pair_is_projected():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2 - (g2.g1/|g1|^2) g1 = (0, 1).
    got = pcgrad(grads, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, torch.tensor([0.25, 0.75], dtype=torch.float64))
    for g in grads:
        assert got @ g >= 0  # for two tasks the result conflicts with neither


def test_sum_is_yu_et_al_and_the_paper_setting():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # Yu et al. sum the projected gradients: (0.5, 0.5) + (0, 1).
    got = pcgrad(grads, torch.Generator().manual_seed(0), reduction="sum")
    torch.testing.assert_close(got, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(mean(grads, reduction="sum"), grads.sum(0))


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction must be one of mean, sum, got 'max'"):
        pcgrad(torch.randn(2, 3), reduction="max")


def test_non_conflicting_gradients_are_untouched():
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [2.0, 1.0, 1.0]])
    assert (grads @ grads.T >= 0).all()
    assert torch.equal(pcgrad(grads, torch.Generator().manual_seed(0)), grads.mean(0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_reference_with_random_orders(seed, reduction):
    grads = torch.randn(5, 7, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    assert (grads @ grads.T < 0).any()
    got = pcgrad(grads, torch.Generator().manual_seed(seed), reduction=reduction)
    torch.testing.assert_close(got, _reference_pcgrad(grads, seed, reduction))
    assert not torch.allclose(got, grads.mean(0))


def test_zero_gradient_rows_are_harmless():
    grads = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-1.0, 0.5]])
    got = pcgrad(grads, torch.Generator().manual_seed(0))
    assert torch.isfinite(got).all()


def test_mean_and_shape_errors():
    grads = torch.randn(4, 3)
    torch.testing.assert_close(mean(grads), grads.mean(0))
    with pytest.raises(ValueError, match=r"shape \(n >= 1, d\), got \(3,\)"):
        pcgrad(torch.randn(3))
    with pytest.raises(ValueError, match=r"got \(0, 3\)"):
        mean(torch.randn(0, 3))
