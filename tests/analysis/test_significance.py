"""Friedman / Nemenyi (Demšar 2006) and the significance command, on published and real numbers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from domainbed_itl.analysis import friedman_nemenyi as sig

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "single_source_debug28"

# Demšar (2006), Table 6: AUC of C4.5 and three variants on 14 UCI datasets ...
DEMSAR_NAMES = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]
DEMSAR_AUC = np.array([
    [0.763, 0.768, 0.771, 0.798], [0.599, 0.591, 0.590, 0.569], [0.954, 0.971, 0.968, 0.967],
    [0.628, 0.661, 0.654, 0.657], [0.882, 0.888, 0.886, 0.898], [0.936, 0.931, 0.916, 0.931],
    [0.661, 0.668, 0.609, 0.685], [0.583, 0.583, 0.563, 0.625], [0.775, 0.838, 0.866, 0.875],
    [1.000, 1.000, 1.000, 1.000], [0.940, 0.962, 0.965, 0.962], [0.619, 0.666, 0.614, 0.669],
    [0.972, 0.981, 0.975, 0.975], [0.957, 0.978, 0.946, 0.970]])
# ... and the ranks printed beside them (computed from unrounded AUCs, hence the voting row).
DEMSAR_RANKS = np.array([
    [4, 3, 2, 1], [1, 2, 3, 4], [4, 1, 2, 3], [4, 1, 3, 2], [4, 2, 3, 1], [1, 2.5, 4, 2.5],
    [3, 2, 4, 1], [2.5, 2.5, 4, 1], [4, 3, 2, 1], [2.5, 2.5, 2.5, 2.5], [4, 2.5, 1, 2.5],
    [3, 2, 4, 1], [4, 1, 2, 3], [3, 1, 4, 2]])


def _table(scores, names):
    return {f"block{i}": dict(zip(names, row)) for i, row in enumerate(scores)}


def test_demsar_worked_example():
    """Sec. 3.2.2: average ranks 3.143/2.000/2.893/1.964, chi2_F = 9.28, F_F = 3.69, and the
    Nemenyi CD = 1.25 at alpha = 0.05 (q = 2.569) and 1.12 at alpha = 0.10 (q = 2.291)."""
    ranks = sig.rank_scores(-DEMSAR_RANKS)  # lower printed rank = better
    np.testing.assert_allclose(ranks, DEMSAR_RANKS)
    np.testing.assert_allclose(ranks.mean(axis=0), [3.143, 2.000, 2.893, 1.964], atol=5e-4)
    f = sig.friedman_test(ranks, tie_correction=False)
    assert round(f.chi2, 2) == 9.28
    assert round(f.iman_davenport, 2) == 3.69
    assert (f.df_num, f.df_den) == (3, 39)
    assert stats.f.ppf(0.95, 3, 39) == pytest.approx(2.85, abs=0.005)  # Demšar's critical F
    assert f.iman_davenport > 2.85 and f.iman_davenport_p < 0.05
    assert round(sig.critical_difference(4, 14, 0.05), 2) == 1.25
    assert round(sig.critical_difference(4, 14, 0.10), 2) == 1.12
    # At 0.05 no pair differs; at 0.10 C4.5 is worse than C4.5+m and C4.5+m+cf.
    at05 = sig.friedman_nemenyi(_table(-DEMSAR_RANKS, DEMSAR_NAMES), DEMSAR_NAMES, 0.05,
                                tie_correction=False)
    assert at05.cliques == (("C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5"),)
    assert (at05.pairwise_p[np.triu_indices(4, 1)] > 0.05).all()
    at10 = sig.friedman_nemenyi(_table(-DEMSAR_RANKS, DEMSAR_NAMES), DEMSAR_NAMES, 0.10)
    assert at10.cliques == (("C4.5+m+cf", "C4.5+m", "C4.5+cf"), ("C4.5+cf", "C4.5"))
    significant = {(a, b) for a in range(4) for b in range(a + 1, 4) if at10.pairwise_p[a, b] <= 0.10}
    assert significant == {(0, 1), (0, 3)}


@pytest.mark.parametrize("k, q", [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (6, 2.850),
                                  (7, 2.949), (8, 3.031), (9, 3.102), (10, 3.164)])
def test_nemenyi_q_matches_demsar_table_5a(k, q):
    assert sig.nemenyi_q(0.05, k) == pytest.approx(q, abs=1e-3)


@pytest.mark.parametrize("k, q", [(2, 1.645), (3, 2.052), (5, 2.459), (10, 2.920)])
def test_nemenyi_q_at_alpha_010_matches_demsar_table_5a(k, q):
    assert sig.nemenyi_q(0.10, k) == pytest.approx(q, abs=1e-3)


def test_tie_corrected_friedman_equals_scipy():
    rng = np.random.default_rng(0)
    for scores in (DEMSAR_AUC, rng.integers(0, 4, size=(9, 5)).astype(float), rng.random((7, 3))):
        ours = sig.friedman_test(sig.rank_scores(scores))
        theirs = stats.friedmanchisquare(*scores.T)
        assert ours.chi2 == pytest.approx(theirs.statistic, rel=1e-12)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


def test_nemenyi_pvalues_equal_scikit_posthocs():
    """Where scikit-posthocs is installed (not a dependency: see docs/single_source.md), its
    posthoc_nemenyi_friedman gives our p-values."""
    posthocs = pytest.importorskip("scikit_posthocs")
    rng = np.random.default_rng(0)
    for scores in (DEMSAR_AUC, rng.integers(0, 4, size=(9, 5)).astype(float), rng.random((12, 6))):
        ours = sig.nemenyi_pvalues(sig.rank_scores(scores).mean(axis=0), len(scores))
        theirs = posthocs.posthoc_nemenyi_friedman(scores).to_numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_ranks_prefer_higher_scores_and_average_ties():
    ranks = sig.rank_scores(np.array([[0.9, 0.5, 0.9, 0.1]]))
    np.testing.assert_allclose(ranks, [[1.5, 3, 1.5, 4]])
    np.testing.assert_allclose(sig.rank_scores(np.array([[0.9, 0.5]]), higher_is_better=False), [[2, 1]])


def test_nemenyi_pvalues_agree_with_the_critical_difference():
    ranks = np.array([1.2, 2.0, 2.45, 3.1, 4.0, 4.25])
    n = 10
    for alpha in (0.01, 0.05, 0.10):
        cd = sig.critical_difference(6, n, alpha)
        p = sig.nemenyi_pvalues(ranks, n)
        diff = np.abs(ranks[:, None] - ranks[None, :])
        off = ~np.eye(6, dtype=bool)
        assert ((p <= alpha) == (diff >= cd))[off].all()
    assert (np.diag(sig.nemenyi_pvalues(ranks, n)) == 1).all()


def test_cliques_are_maximal_runs():
    # Ranks: A 1.0, B 1.5, C 2.2, D 3.0, E 3.1; CD 1.0 -> A-B (A-C differs by 1.2), B-C, C-D-E
    assert sig.cliques([1.0, 1.5, 2.2, 3.0, 3.1], 1.0) == [(0, 1), (1, 2), (2, 3, 4)]
    assert sig.cliques([1.0, 2.0, 3.0], 0.5) == []
    assert sig.cliques([3.0, 1.0, 2.0], 5.0) == [(1, 2, 0)]


def test_degenerate_rankings():
    perfect = sig.friedman_test(np.tile([1.0, 2.0, 3.0], (5, 1)))
    assert perfect.chi2 == pytest.approx(10.0) and perfect.iman_davenport == float("inf")
    assert perfect.iman_davenport_p == 0.0
    result = sig.friedman_nemenyi(_table(np.tile([0.9, 0.5, 0.1], (3, 1)), ["A", "B", "C"]), ["A", "B", "C"])
    assert "Iman-Davenport F is infinite" in sig.format_result(result, "t")
    ties = sig.friedman_test(np.full((4, 3), 2.0))
    assert (ties.chi2, ties.p_value) == (0.0, 1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 2 algorithms and 2 blocks, got 1 and 3"):
        sig.friedman_test(np.ones((3, 1)))
    with pytest.raises(ValueError, match="NaN"):
        sig.rank_scores(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="alpha must be between 0 and 1, got 1.5"):
        sig.nemenyi_q(1.5, 3)
    with pytest.raises(ValueError, match="listed twice"):
        sig.friedman_nemenyi(_table(DEMSAR_AUC, DEMSAR_NAMES), ["C4.5", "C4.5"])
    with pytest.raises(ValueError, match=r"need at least 2 blocks .* b0 lacks B"):
        sig.friedman_nemenyi({"b0": {"A": 1.0}, "b1": {"A": 0.5, "B": 0.4}}, ["A", "B"])
    with pytest.raises(ValueError, match="two scores for block 'b', algorithm 'A', trial 0"):
        sig.mean_over_trials([("b", "A", 0, 0.1), ("b", "A", 0, 0.2)])


def test_blocks_lacking_an_algorithm_are_dropped_and_listed():
    table = _table(DEMSAR_AUC, DEMSAR_NAMES)
    table["extra"] = {"C4.5": 0.5, "C4.5+m": 0.6}
    result = sig.friedman_nemenyi(table, DEMSAR_NAMES)
    assert len(result.blocks) == 14 and result.dropped_blocks == (("extra", ("C4.5+cf", "C4.5+m+cf")),)
    text = sig.format_result(result, "title")
    assert "Dropped 1 blocks" in text and "extra (lacks C4.5+cf, C4.5+m+cf)" in text


def test_mean_over_trials():
    table, counts = sig.mean_over_trials([("b", "A", 0, 0.2), ("b", "A", 1, 0.4), ("b", "B", 0, 0.9)])
    assert table == {"b": {"A": pytest.approx(0.3), "B": 0.9}}
    assert counts == {("b", "A"): 2, ("b", "B"): 1}


def test_report_text_and_diagram():
    result = sig.friedman_nemenyi(_table(DEMSAR_AUC, DEMSAR_NAMES), DEMSAR_NAMES, 0.10)
    text = sig.format_result(result, "Demsar Table 6")
    assert "N = 14 blocks, k = 4 algorithms" in text
    assert f"CD = {result.critical_difference:.3f}" in text
    assert text.index("C4.5+m+cf  ") < text.index("C4.5       ")  # best first
    png = sig.cd_diagram_png(result, "Demsar Table 6")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2 * height > 0


def _significance(*args):
    return subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.significance", *args],
                          capture_output=True, text=True, timeout=300)


def test_command_on_real_single_source_runs(tmp_path):
    """The committed Debug28 sweep (real DomainBed runs): ranks per source domain, files written
    once, never overwritten silently."""
    out = tmp_path / "sig"
    result = _significance("--single_source_dir", str(FIXTURE), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    text = (out / "cd_single_source_domain.txt").read_text()
    assert "N = 3 blocks, k = 2 algorithms" in text
    assert (out / "cd_single_source_domain.png").read_bytes().startswith(b"\x89PNG")
    from domainbed_itl.files.sweepfolder import load_runs, read_manifest
    from domainbed_itl.single_source.selection import summarise

    scores = summarise(load_runs(FIXTURE), read_manifest(FIXTURE)).scores(
        "domain", ["ERM", "ITL"], ["Debug28"])
    expected = sig.friedman_nemenyi(scores, ["ERM", "ITL"])
    for name, rank in zip(expected.algorithms, expected.average_ranks):
        assert f"{name}  {rank:.3f}" in text
    before = (out / "cd_single_source_domain.txt").read_bytes()
    again = _significance("--single_source_dir", str(FIXTURE), "--output_dir", str(out))
    assert again.returncode == 2 and "cd_single_source_domain.txt" in again.stderr
    assert "pass --overwrite" in again.stderr
    assert (out / "cd_single_source_domain.txt").read_bytes() == before
    pairs = _significance("--single_source_dir", str(FIXTURE), "--output_dir", str(out),
                                  "--blocks", "pair")
    assert pairs.returncode == 0, pairs.stderr
    assert "N = 6 blocks" in (out / "cd_single_source_pair.txt").read_text()


def test_command_rejects_bad_input(tmp_path):
    nothing = _significance("--output_dir", str(tmp_path))
    assert nothing.returncode == 2 and "--single_source_dir" in nothing.stderr
    unknown = _significance("--single_source_dir", str(FIXTURE), "--output_dir", str(tmp_path),
                            "--algorithms", "ERM", "SagNet")
    assert unknown.returncode == 2 and "algorithm 'SagNet' not in the results" in unknown.stderr
    one_block = _significance("--single_source_dir", str(FIXTURE), "--output_dir", str(tmp_path),
                              "--blocks", "dataset")
    assert one_block.returncode == 2 and "need at least 2 blocks" in one_block.stderr


@pytest.mark.slow
def test_multi_source_uses_domainbed_selection(domainbed_root, tmp_path):
    """The fixture folder also holds a DomainBed multi-source sweep (its own sweep.py, test envs
    one at a time): the command's multi-source scores are DomainBed's training-domain
    validation accuracies, averaged over trials."""
    from domainbed import model_selection
    from domainbed.lib import reporting

    grouped = reporting.get_grouped_records(reporting.load_records(str(FIXTURE)))
    accs = {}
    for group in grouped:
        acc = model_selection.IIDAccuracySelectionMethod.sweep_acc(group["records"])
        if acc is not None:
            accs.setdefault((group["algorithm"], group["test_env"]), []).append(acc)
    assert len(accs) == 6 and all(len(v) == 2 for v in accs.values())
    table = {f"Debug28:{e}": {a: float(np.mean(accs[a, e])) for a in ("ERM", "ITL")} for e in range(3)}
    expected = sig.friedman_nemenyi(table, ["ERM", "ITL"])

    result = _significance("--multi_source_dir", str(FIXTURE), "--single_source_dir", str(FIXTURE),
                           "--output_dir", str(tmp_path), "--domainbed_root", str(domainbed_root))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "cd_multi_source_domain.txt").read_text()
    for name, rank in zip(expected.algorithms, expected.average_ranks):
        assert f"{name}  {rank:.3f}" in text
    assert f"Friedman chi2(1) = {expected.friedman.chi2:.3f}" in text
    assert (tmp_path / "cd_single_source_domain.png").exists()
    assert (tmp_path / "cd_multi_source_domain.png").exists()


@pytest.mark.slow
def test_multi_source_report_survives_a_damaged_record(domainbed_root, tmp_path):
    """DomainBed's own load_records stops at a line that is not a record; ours lists and skips it."""
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(FIXTURE, copy)
    results = next(p / "results.jsonl" for p in sorted(copy.iterdir()) if (p / "results.jsonl").exists()
                   and len(json.loads((p / "results.jsonl").read_text().splitlines()[0])["args"]
                           ["test_envs"]) == 1)
    lines = results.read_text().splitlines()
    results.write_text("\n".join([lines[0], "42", *lines[1:]]) + "\n")
    result = _significance("--multi_source_dir", str(copy), "--output_dir", str(tmp_path / "sig"),
                           "--domainbed_root", str(domainbed_root))
    assert result.returncode == 0, result.stderr
    assert (f"Note: multi-source: skipped 1 damaged records or manifest entries: {results}:2: not a "
            "JSON object but 42") in result.stdout

