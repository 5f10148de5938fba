"""Paired comparison statistics on synthetic records, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from domainbed_itl.analysis import comparison


def _records(values, loss, domains=("a", "b")):
    """Records whose domain mean for unit u is values[u] (domains at values[u] ± 0.1)."""
    out = []
    for unit, v in enumerate(values):
        for k, d in enumerate(domains):
            out.append({"loss": loss, "unit": unit, "domain": d, "acc": v + (0.1 if k else -0.1),
                        "steps": 10})
    return out


def test_summary_is_mean_sample_se_and_range():
    s = comparison.summarize([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    # sample sd = sqrt(((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2) = sqrt(7/3)
    assert s.se == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert (s.minimum, s.maximum, s.n) == (1.0, 4.0, 3)
    assert math.isnan(comparison.summarize([5.0]).se)
    with pytest.raises(ValueError, match="empty"):
        comparison.summarize([])


def test_paired_difference_by_hand():
    a, b = [0.80, 0.75, 0.90, 0.70, 0.85], [0.78, 0.76, 0.85, 0.66, 0.80]
    d = comparison.paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b)]  # 0.02, -0.01, 0.05, 0.04, 0.05
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4)
    assert d.mean == pytest.approx(mean) and d.se == pytest.approx(sd / math.sqrt(5))
    assert (d.wins, d.ties, d.n) == (4, 0, 5)
    # t = mean / (sd/√n) with 4 degrees of freedom; two-sided p from Student's t.
    t = mean / (sd / math.sqrt(5))
    from scipy.stats import t as student
    assert d.t_pvalue == pytest.approx(2 * student.sf(abs(t), 4))
    # Wilcoxon, exact: ranks of |d| = 2, 1, 4.5, 3, 4.5; W- = 1 (the one negative); the exact
    # two-sided p for W = 1 with n = 5 (no ties in the null distribution's count) is 2 * 2/32.
    assert d.wilcoxon_pvalue == pytest.approx(0.125, abs=0.01)


def test_a_win_is_a_lower_value_where_lower_is_better():
    values, reference = [0.4, 0.6, 0.5], [0.5, 0.5, 0.5]
    assert comparison.paired_difference(values, reference).wins == 1
    lower = comparison.paired_difference(values, reference, higher_is_better=False)
    assert (lower.wins, lower.ties, lower.mean) == (1, 1, pytest.approx(0.0))
    assert comparison.paired_difference([0.1, 0.2], [0.3, 0.3], higher_is_better=False).wins == 2


def test_paired_difference_edge_cases():
    same = comparison.paired_difference([0.5, 0.6], [0.5, 0.6])
    assert same.mean == 0 and same.ties == 2 and math.isnan(same.t_pvalue)
    one = comparison.paired_difference([0.7], [0.5])
    assert one.wins == 1 and math.isnan(one.t_pvalue) and math.isnan(one.se)
    with pytest.raises(ValueError, match="equally long"):
        comparison.paired_difference([0.1, 0.2], [0.1])


def test_compare_pairs_units_and_keeps_groups_apart():
    records = _records([0.5, 0.6, 0.7], "CE") + _records([0.6, 0.6, 0.9], "new")
    records += [dict(r, steps=20, acc=r["acc"] + 0.05) for r in _records([0.5, 0.6, 0.7], "CE")]
    result = comparison.compare(records, "acc", "CE", group=["steps"])
    assert set(result) == {("CE", 10), ("new", 10), ("CE", 20)}
    assert "difference" not in result[("CE", 10)] and "difference" not in result[("CE", 20)]
    diff = result[("new", 10)]["difference"]
    assert diff.mean == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    assert (diff.wins, diff.ties) == (2, 1)
    assert result[("CE", 20)]["summary"].mean == pytest.approx(0.65)


def test_compare_uses_only_the_units_both_losses_have():
    records = _records([0.5, 0.6, 0.7], "CE") + _records([0.9, 0.9], "new")
    diff = comparison.compare(records, "acc", "CE")[("new",)]["difference"]
    assert diff.n == 2 and diff.mean == pytest.approx((0.4 + 0.3) / 2)


def test_markdown_table_and_json():
    records = _records([0.5, 0.6, 0.7], "CE") + _records([0.6, 0.6, 0.9], "new")
    result = comparison.compare(records, "acc", "CE")
    table = comparison.markdown_table(result, "acc (%)", "CE", scale=100, order=["CE", "new"])
    lines = table.splitlines()
    assert lines[2].startswith("| CE | 60.0 ± 5.8 [50.0, 70.0] | (reference) |")
    assert lines[3].startswith("| new | 70.0 ± 10.0 [60.0, 90.0] | 10.0 ± 5.8 | 2/3 |")
    rows = comparison.to_jsonable(result)
    assert rows[1]["difference"]["wins"] == 2 and rows[0]["loss"] == "CE"
    single = comparison.to_jsonable(comparison.compare(_records([0.5], "CE"), "acc", "CE"))
    assert single[0]["summary"]["se"] is None
