"""PCGrad aggregation of per-domain hypergradients (Yu et al., 2020) and the plain mean."""

from __future__ import annotations

import pytest
import torch

from domainbed_itl.meta.aggregators import aggregate, aggregator_note, mean, pcgrad


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


# --------------------------------------------------------------- reports and the stall rule


def test_one_parameter_pcgrad_cancels_whole_and_the_rule_uses_the_mean():
    """With one parameter, domains that differ in sign project each other to 0 (issue 24's stall)."""
    grads = torch.tensor([[0.5], [-0.2], [0.3]], dtype=torch.float64)
    assert pcgrad(grads, torch.Generator().manual_seed(0)).abs().item() < 1e-15
    report = aggregate("pcgrad", grads, torch.Generator().manual_seed(0))
    torch.testing.assert_close(report.update, grads.mean(0))
    assert report.fallback.startswith("pcgrad removed the whole update (norm ")
    assert report.fallback.endswith("of the plain mean's) for 3 domains and 1 parameter; the plain "
                                    "mean was used")
    assert report.record() == {"aggregator_removed": 0.0, "aggregator_norm_ratio": 1.0,
                               "aggregator_fallback": report.fallback}
    summed = aggregate("pcgrad", grads, torch.Generator().manual_seed(0), reduction="sum")
    torch.testing.assert_close(summed.update, grads.sum(0))


def test_one_parameter_pcgrad_in_agreement_is_the_mean_without_a_fallback():
    grads = torch.tensor([[0.5], [0.2], [0.3]], dtype=torch.float64)
    report = aggregate("pcgrad", grads, torch.Generator().manual_seed(0))
    torch.testing.assert_close(report.update, grads.mean(0))
    assert report.fallback is None and report.removed == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_where_pcgrad_does_not_cancel_the_report_keeps_its_numbers(seed, reduction):
    grads = torch.randn(5, 7, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    report = aggregate("pcgrad", grads, torch.Generator().manual_seed(seed), reduction=reduction)
    expected = _reference_pcgrad(grads, seed, reduction)
    assert torch.equal(report.update, pcgrad(grads, torch.Generator().manual_seed(seed), reduction=reduction))
    torch.testing.assert_close(report.update, expected)
    plain = grads.sum(0) if reduction == "sum" else grads.mean(0)
    assert report.fallback is None
    assert report.removed == pytest.approx(1 - float(expected @ plain) / float(plain @ plain))
    assert report.norm_ratio == pytest.approx(float(expected.norm() / plain.norm()))
    assert report.removed != pytest.approx(0.0, abs=1e-3)


def test_a_partial_cancellation_is_reported_not_replaced():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    report = aggregate("pcgrad", grads, torch.Generator().manual_seed(0))
    # PCGrad (0.25, 0.75) against the mean (0, 0.5): <., .>/|mean|^2 = 1.5, so removed = -0.5.
    torch.testing.assert_close(report.update, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert report.removed == pytest.approx(-0.5) and report.fallback is None


def test_the_mean_removes_nothing_and_a_zero_plain_update_has_no_fraction():
    grads = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    report = aggregate("mean", grads)
    assert report.removed == pytest.approx(0.0, abs=1e-6) and report.norm_ratio == pytest.approx(1.0)
    zero = aggregate("pcgrad", torch.tensor([[1.0], [-1.0]]), torch.Generator().manual_seed(0))
    assert zero.removed is None and zero.norm_ratio is None and zero.fallback is None
    with pytest.raises(ValueError, match="unknown aggregator 'median'; expected one of pcgrad, mean"):
        aggregate("median", grads)


def test_a_run_is_warned_when_pcgrad_has_fewer_parameters_than_domains():
    note = aggregator_note("pcgrad", 1, 6)
    assert note.startswith("PCGrad with 1 parameter and 6 domains: domains whose hypergradients")
    assert "plain mean" in aggregator_note("pcgrad", 2, 6)
    assert aggregator_note("pcgrad", 12, 6) is None and aggregator_note("mean", 1, 6) is None
