"""The grid search: its points, its bad values, the best member from paired results, its command
(resumed, extended, run as a subprocess)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from domainbed_itl.analysis import comparison
from domainbed_itl.analysis.grid_report import best_members, grid_markdown, grid_rows, grid_winners
from domainbed_itl.losses.grid import GridError, parse_grid
from domainbed_itl.meta import evaluate
from domainbed_itl.scripts import grid_search

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "synthetic", "--per_domain_cap", "40", "--seeds", "0", "1", "--inner_steps",
        "10", "--hidden", "4", "--batch_size", "16", "--eval_size", "40", "--no_progress"]


def _logits():
    torch.manual_seed(0)
    return torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 5, (32,))


def test_grid_points_are_the_family_members_at_each_value():
    grid = parse_grid(["label_smoothing=0.05,0.3", "poly1=-1,2", "focal=0,1.5",
                       "sce.alpha=0.1,1", "sce.beta=0.5,2"], num_classes=5)
    assert {k: list(v) for k, v in grid.items()} == {
        "label_smoothing": ["label_smoothing:0.05", "label_smoothing:0.3"],
        "poly1": ["poly1:-1", "poly1:2"], "focal": ["focal:0", "focal:1.5"],
        "sce": ["sce:0.1,0.5", "sce:0.1,2", "sce:1,0.5", "sce:1,2"]}
    logits, y = _logits()
    p_t = F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    ce = F.cross_entropy(logits, y, reduction="none")
    expected = {  # each family's formula at the member's value
        "label_smoothing:0.05": F.cross_entropy(logits, y, reduction="none", label_smoothing=0.05),
        "label_smoothing:0.3": F.cross_entropy(logits, y, reduction="none", label_smoothing=0.3),
        "poly1:-1": ce - (1 - p_t), "poly1:2": ce + 2 * (1 - p_t),
        "focal:0": ce, "focal:1.5": (1 - p_t) ** 1.5 * ce}
    for family in ("label_smoothing", "poly1", "focal"):
        for label, spec in grid[family].items():
            got = spec.module()(logits, y, reduction="none")
            torch.testing.assert_close(got, expected[label])
    assert grid["sce"]["sce:1,0.5"].parameters == [1.0, 0.5]
    assert grid["poly1"]["poly1:2"].definition() == {"family": "poly", "order": 1, "parameters": [2.0]}
    # a parameter not given keeps its default: SCE's β = 1
    assert list(parse_grid(["sce.alpha=0.5"], 5)["sce"]) == ["sce:0.5,1"]


@pytest.mark.parametrize("entries, message", [
    (["poly1=-1.5"], "grid entry 'poly1=-1.5': epsilon1"),
    (["label_smoothing=0.1,1"], "must be finite and in [0, 1), got epsilon=1.0"),
    (["gce=0"], "got q=0.0"),
    (["focal=-1"], "got gamma=-1.0"),
    (["nope=1"], "grid entry 'nope=1': unknown loss family 'nope'"),
    (["taylor4=1"], "has 12 parameters; a grid takes families of one or two"),
    (["poly3=1"], "has 3 parameters; a grid takes families of one or two"),
    (["sce=1"], "give each one's values as sce.alpha=... sce.beta=..."),
    (["sce.gamma=1"], "has no parameter 'gamma'"),
    (["focal=1,x"], "'x' is not a number"),
    (["focal=2,2"], "the value 2 is given twice"),
    (["focal=1", "focal=2"], "focal gamma is given twice"),
    (["focal"], "expected NAME=V1,V2,..."),
])
def test_bad_grid_values_are_refused_in_one_line_naming_them(entries, message):
    with pytest.raises(GridError) as error:
        parse_grid(entries, num_classes=10)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert error.value.entry in entries and error.value.problem in str(error.value)


def _records(accuracy):
    """Records of {loss: [accuracy per seed]} at 100 and 200 inner steps (200: the ranking
    reversed), two domains each averaging to the given accuracy."""
    out = []
    for steps, sign in ((100, 1), (200, -1)):
        for loss, values in accuracy.items():
            for seed, acc in enumerate(values):
                shift = 0.0 if loss == "CE" else sign * (acc - accuracy["CE"][seed])
                for domain, offset in (("a", -0.05), ("b", 0.05)):
                    out.append({"loss": loss, "unit": seed, "domain": domain, "inner_steps": steps,
                                "heldout_acc": accuracy["CE"][seed] + shift + offset})
    return out


def test_the_best_member_of_each_family_is_picked_from_the_paired_results():
    grid = parse_grid(["focal=1,2,3", "gce=0.5"], num_classes=10)
    accuracy = {"CE": [0.50, 0.60, 0.70], "focal:1": [0.52, 0.61, 0.72],
                "focal:2": [0.55, 0.60, 0.74], "focal:3": [0.49, 0.58, 0.69], "gce:0.5": [0.41, 0.5, 0.62]}
    result = comparison.compare(_records(accuracy), "heldout_acc", "CE", ["inner_steps"])
    assert best_members(result, grid) == {("focal", 100): "focal:2", ("gce", 100): "gce:0.5",
                                          ("focal", 200): "focal:3", ("gce", 200): "gce:0.5"}
    rows = grid_rows(result, grid, ["CE"])
    assert [(r["loss"], r["inner_steps"], r["best"]) for r in rows[:5]] == [
        ("focal:1", 100, False), ("focal:2", 100, True), ("focal:3", 100, False),
        ("gce:0.5", 100, True), ("CE", 100, False)]
    focal2 = rows[1]
    assert focal2["parameters"] == {"gamma": 2.0} and focal2["wins"] == 2 and focal2["n"] == 3
    assert focal2["delta_mean"] == pytest.approx((0.05 + 0.0 + 0.04) / 3)
    assert focal2["t_pvalue"] == pytest.approx(stats.ttest_rel(accuracy["focal:2"], accuracy["CE"]).pvalue)
    assert rows[4]["family"] is None and rows[4]["delta_mean"] is None
    table = grid_markdown(rows, "CE")
    assert "| focal | focal:2 | 63.0 ± 5.7 [55.0, 74.0] | 3.0 ± 1.5 | 2/3 |" in table
    assert "| (extra) | CE | 60.0 ± 5.8 [50.0, 70.0] | (reference) |" in table
    assert "grid's best" not in table


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # a constant difference
def test_every_loss_is_compared_with_the_grid_s_best_member_at_each_length():
    grid = parse_grid(["focal=1,2,3", "gce=0.5"], num_classes=10)
    accuracy = {"CE": [0.50, 0.60, 0.70], "focal:1": [0.52, 0.61, 0.72],
                "focal:2": [0.55, 0.60, 0.74], "focal:3": [0.49, 0.58, 0.69],
                "gce:0.5": [0.56, 0.62, 0.73], "mine": [0.575, 0.63, 0.72]}
    records = _records(accuracy)
    result = comparison.compare(records, "heldout_acc", "CE", ["inner_steps"])
    # at 100 steps gce:0.5 gains most over CE (0.037 against focal:2's 0.030); at 200, reversed
    assert grid_winners(result, grid) == {100: "gce:0.5", 200: "focal:3"}
    rows = {(r["loss"], r["inner_steps"]): r for r in grid_rows(result, grid, ["CE", "mine"], records)}
    mine = rows[("mine", 100)]
    assert mine["grid_best"] == "gce:0.5" and mine["grid_best_wins"] == 2
    assert mine["grid_best_delta_mean"] == pytest.approx((0.015 + 0.01 - 0.01) / 3)
    assert mine["grid_best_t_pvalue"] == pytest.approx(
        stats.ttest_rel(accuracy["mine"], accuracy["gce:0.5"]).pvalue)
    assert rows[("gce:0.5", 100)]["grid_best_delta_mean"] is None
    assert rows[("focal:3", 200)]["grid_best"] == "focal:3"
    table = grid_markdown(list(rows.values()), "CE")
    assert "| Δ vs the grid's best (gce:0.5) mean ± SE | seeds won | t-test p |" in table
    assert ("| (extra) | mine | 64.2 ± 4.2 [57.5, 72.0] | 4.2 ± 1.7 | 3/3 | 0.133 |  "
            "| 0.5 ± 0.8 | 2/3 | 0.580 |") in table
    assert ("| gce | gce:0.5 | 63.7 ± 5.0 [56.0, 73.0] | 3.7 ± 1.2 | 3/3 | 0.093 | **best** "
            "| (the grid's best) |") in table
    assert "| Δ vs the grid's best (focal:3) mean ± SE |" in table


def test_the_command_resumes_and_extends_a_grid_computing_only_new_units(tmp_path, monkeypatch):
    computed, unit = [], evaluate._evaluate_unit

    def counted(setup, seed, name, loss):
        computed.append((seed, name))
        return unit(setup, seed, name, loss)

    monkeypatch.setattr(evaluate, "_evaluate_unit", counted)
    out = tmp_path / "grid"
    assert grid_search.main(["--grid", "focal=1", *TINY, "--output_dir", str(out)]) == 0
    first = json.loads((out / "grid.json").read_text())
    assert sorted(computed) == [(0, "CE"), (0, "focal:1"), (1, "CE"), (1, "focal:1")]
    computed.clear()
    assert grid_search.main(["--grid", "focal=1,2", *TINY, "--output_dir", str(out)]) == 0
    assert sorted(computed) == [(0, "focal:2"), (1, "focal:2")]
    second = json.loads((out / "grid.json").read_text())
    kept = [r for r in second["records"] if r["loss"] != "focal:2"]
    assert kept == first["records"]
    assert sum(r["best"] for r in second["rows"]) == 1
    computed.clear()
    assert grid_search.main(["--grid", "focal=1,2", *TINY, "--output_dir", str(out)]) == 0
    assert computed == [] and json.loads((out / "grid.json").read_text())["rows"] == second["rows"]


def test_the_command_refuses_a_grid_value_out_of_range_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "grid"
    assert grid_search.main(["--grid", "label_smoothing=0.1,1.2", *TINY, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --grid 'label_smoothing=0.1,1.2': epsilon") and "epsilon=1.2" in err
    assert "\n" not in err and not out.exists()


def test_grid_search_runs_as_a_command(tmp_path):
    out = tmp_path / "grid"
    done = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.grid_search", "--grid",
                           "label_smoothing=0.1,0.2", "poly1=1", "--losses", "CE", "ITL", *TINY,
                           "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "### Held-out accuracy (%), inner steps 10" in done.stdout
    rows = list(csv.DictReader((out / "grid.csv").open()))
    assert [r["loss"] for r in rows] == ["label_smoothing:0.1", "label_smoothing:0.2", "poly1:1",
                                         "CE", "ITL"]
    assert [r["best"] for r in rows].count("True") == 2 and rows[2]["best"] == "True"
    report = json.loads((out / "grid.json").read_text())
    assert report["grid"]["poly1"]["poly1:1"] == {"family": "poly", "order": 1, "parameters": [1.0]}
    assert len(report["records"]) == 5 * 2 * 6 and (out / "grid.md").read_text().count("**best**") == 2
    winner = next(r["loss"] for r in rows if r["best"] == "True" and r["grid_best_delta_mean"] == "")
    assert {r["grid_best"] for r in rows} == {winner} and winner.startswith(("label_smoothing", "poly1"))
    assert f"Δ vs the grid's best ({winner})" in done.stdout
