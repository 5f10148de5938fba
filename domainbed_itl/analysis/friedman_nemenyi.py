"""Friedman test, Nemenyi post-hoc test and critical-difference diagrams (Demšar, JMLR 2006).

See docs/single_source.md.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class FriedmanResult:
    """The Friedman chi-square statistic and the Iman-Davenport F statistic, with p-values."""

    chi2: float
    p_value: float
    iman_davenport: float
    iman_davenport_p: float
    df_num: int
    df_den: int


@dataclass(frozen=True)
class SignificanceResult:
    """The full comparison of `algorithms` over `blocks`."""

    algorithms: Tuple[str, ...]
    blocks: Tuple[str, ...]
    scores: np.ndarray
    ranks: np.ndarray
    average_ranks: np.ndarray
    friedman: FriedmanResult
    alpha: float
    q_alpha: float
    critical_difference: float
    pairwise_p: np.ndarray
    cliques: Tuple[Tuple[str, ...], ...]
    dropped_blocks: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()


def rank_scores(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank the algorithms (columns) within each block (row): 1 = best, ties share the mean rank."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a blocks x algorithms matrix, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; drop the blocks without a value for every algorithm")
    return stats.rankdata(-scores if higher_is_better else scores, axis=1)


def friedman_test(ranks: np.ndarray, tie_correction: bool = True) -> FriedmanResult:
    """Friedman's chi-square on a blocks x algorithms rank matrix, and Iman and Davenport's F.

    With `tie_correction` the statistic is divided by 1 - sum(t^3 - t) / (N k (k^2 - 1)) over tie
    groups of size t, as scipy.stats.friedmanchisquare does; without it, it is Demšar's Eq. (1).
    Blocks in which every algorithm ties carry no information: if all do, chi2 = 0, p = 1.
    """
    ranks = np.asarray(ranks, dtype=float)
    n, k = ranks.shape
    if k < 2 or n < 2:
        raise ValueError(f"the Friedman test needs at least 2 algorithms and 2 blocks, got {k} and {n}")
    average = ranks.mean(axis=0)
    chi2 = 12 * n / (k * (k + 1)) * (np.sum(average ** 2) - k * (k + 1) ** 2 / 4)
    if tie_correction:
        ties = sum(float(np.sum(c ** 3 - c)) for c in
                   (np.unique(row, return_counts=True)[1] for row in ranks))
        correction = 1 - ties / (n * k * (k * k - 1))
        chi2 = chi2 / correction if correction > 0 else 0.0
    chi2 = max(float(chi2), 0.0)
    df_num, df_den = k - 1, (k - 1) * (n - 1)
    denominator = n * (k - 1) - chi2
    f = (n - 1) * chi2 / denominator if denominator > 0 else math.inf
    return FriedmanResult(chi2, float(stats.chi2.sf(chi2, df_num)), float(f),
                          float(stats.f.sf(f, df_num, df_den)) if math.isfinite(f) else 0.0,
                          df_num, df_den)


def nemenyi_q(alpha: float, k: int) -> float:
    """Demšar's q_alpha: the studentized range quantile (k groups, df = inf) over sqrt(2)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if k < 2:
        raise ValueError(f"the Nemenyi test needs at least 2 algorithms, got {k}")
    return float(stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """The Nemenyi critical difference of average ranks for k algorithms over n blocks."""
    if n < 1:
        raise ValueError(f"need at least 1 block, got {n}")
    return nemenyi_q(alpha, k) * math.sqrt(k * (k + 1) / (6 * n))


def nemenyi_pvalues(average_ranks: Sequence[float], n: int) -> np.ndarray:
    """Pairwise Nemenyi p-values: p <= alpha exactly when the ranks differ by >= CD(alpha)."""
    average_ranks = np.asarray(average_ranks, dtype=float)
    k = average_ranks.size
    scale = math.sqrt(k * (k + 1) / (6 * n))
    diff = np.abs(average_ranks[:, None] - average_ranks[None, :]) / scale * math.sqrt(2)
    p = stats.studentized_range.sf(diff, k, np.inf)
    np.fill_diagonal(p, 1.0)
    return np.clip(p, 0.0, 1.0)


def cliques(average_ranks: Sequence[float], cd: float) -> List[Tuple[int, ...]]:
    """Maximal runs of algorithms (indices, best first) whose ranks all differ by less than cd:
    the thick bars of a critical-difference diagram. Runs of one algorithm are left out."""
    ranks = np.asarray(average_ranks, dtype=float)
    order = list(np.argsort(ranks, kind="stable"))
    groups, last_end = [], 0
    for i in range(len(order)):
        j = i
        while j + 1 < len(order) and ranks[order[j + 1]] - ranks[order[i]] < cd:
            j += 1
        if j > i and j > last_end:
            groups.append(tuple(int(x) for x in order[i:j + 1]))
            last_end = j
    return groups


def complete_blocks(table: Mapping[str, Mapping[str, float]], algorithms: Sequence[str]
                    ) -> Tuple[List[str], np.ndarray, List[Tuple[str, Tuple[str, ...]]]]:
    """The blocks with a score for every algorithm, their score matrix, and the other blocks
    with the algorithms they lack."""
    kept, rows, dropped = [], [], []
    for block, row in table.items():
        missing = tuple(a for a in algorithms if a not in row)
        if missing:
            dropped.append((block, missing))
        else:
            kept.append(block)
            rows.append([float(row[a]) for a in algorithms])
    return kept, np.array(rows, dtype=float).reshape(len(rows), len(algorithms)), dropped


def friedman_nemenyi(table: Mapping[str, Mapping[str, float]], algorithms: Sequence[str],
                     alpha: float = 0.05, tie_correction: bool = True) -> SignificanceResult:
    """Compare `algorithms` on the blocks of `table` ({block: {algorithm: score}}, higher is
    better) that have a score for every one of them; the others are listed as dropped."""
    algorithms = tuple(algorithms)
    if len(set(algorithms)) != len(algorithms):
        raise ValueError(f"algorithms listed twice: {list(algorithms)}")
    blocks, scores, dropped = complete_blocks(table, algorithms)
    if len(blocks) < 2:
        raise ValueError(f"need at least 2 blocks with a score for every one of {', '.join(algorithms)}; "
                         f"have {len(blocks)} ({len(dropped)} blocks lack some: " +
                         "; ".join(f"{b} lacks {', '.join(m)}" for b, m in dropped[:5]) + ")")
    ranks = rank_scores(scores)
    average = ranks.mean(axis=0)
    cd = critical_difference(len(algorithms), len(blocks), alpha)
    return SignificanceResult(
        algorithms, tuple(blocks), scores, ranks, average,
        friedman_test(ranks, tie_correction), alpha, nemenyi_q(alpha, len(algorithms)), cd,
        nemenyi_pvalues(average, len(blocks)),
        tuple(tuple(algorithms[i] for i in g) for g in cliques(average, cd)), tuple(dropped))


def mean_over_trials(entries: Iterable[Tuple[str, str, int, float]]
                     ) -> Tuple[Dict[str, Dict[str, float]], Dict[Tuple[str, str], int]]:
    """From (block, algorithm, trial, score) entries: {block: {algorithm: mean over trials}} and
    the number of trials behind each (block, algorithm). A repeated (block, algorithm, trial)
    is an error."""
    values: Dict[Tuple[str, str], Dict[int, float]] = {}
    for block, algorithm, trial, score in entries:
        trials = values.setdefault((block, algorithm), {})
        if trial in trials:
            raise ValueError(f"two scores for block {block!r}, algorithm {algorithm!r}, trial {trial}")
        trials[trial] = float(score)
    table: Dict[str, Dict[str, float]] = {}
    for (block, algorithm), trials in values.items():
        table.setdefault(block, {})[algorithm] = float(np.mean(list(trials.values())))
    return table, {key: len(trials) for key, trials in values.items()}


def format_result(result: SignificanceResult, title: str) -> str:
    """The comparison as plain text: statistics, ranks, groups, pairwise p-values."""
    k, n = len(result.algorithms), len(result.blocks)
    f = result.friedman
    order = np.argsort(result.average_ranks, kind="stable")
    width = max(len(a) for a in result.algorithms)
    lines = [title, f"N = {n} blocks, k = {k} algorithms; rank 1 = highest accuracy."]
    if result.dropped_blocks:
        lines.append(f"Dropped {len(result.dropped_blocks)} blocks without a score for every algorithm:")
        lines += [f"  {b} (lacks {', '.join(m)})" for b, m in result.dropped_blocks]
    lines += [
        f"Friedman chi2({f.df_num}) = {f.chi2:.3f}, p = {f.p_value:.4g}; Iman-Davenport "
        f"F({f.df_num}, {f.df_den}) = {f.iman_davenport:.3f}, p = {f.iman_davenport_p:.4g}",
        f"Nemenyi: alpha = {result.alpha}, q_alpha = {result.q_alpha:.3f}, "
        f"CD = {result.critical_difference:.3f}"]
    if not math.isfinite(f.iman_davenport):
        lines.append("Every block ranks the algorithms alike: the Iman-Davenport F is infinite and its "
                     "p-value a limit; rely on the chi2 p-value.")
    if f.p_value > result.alpha:
        lines.append(f"The Friedman test does not reject equal performance at alpha = {result.alpha}: "
                     f"the post-hoc differences below are not evidence (Demšar 2006, Sec. 3.2.2).")
    lines.append("Average ranks:")
    lines += [f"  {result.algorithms[i].ljust(width)}  {result.average_ranks[i]:.3f}" for i in order]
    lines.append("Groups without significant differences (thick bars):")
    lines += [f"  {', '.join(g)}" for g in result.cliques] or ["  none"]
    significant = [(i, j) for a, i in enumerate(order) for j in order[a + 1:]
                   if result.pairwise_p[i, j] <= result.alpha]
    lines.append("Significantly different pairs (better first):")
    lines += [f"  {result.algorithms[i]} > {result.algorithms[j]}: rank difference "
              f"{result.average_ranks[j] - result.average_ranks[i]:.3f}, p = {result.pairwise_p[i, j]:.4g}"
              for i, j in significant] or ["  none"]
    lines.append("Pairwise Nemenyi p-values:")
    lines.append("  " + " " * width + "".join(f"  {result.algorithms[j][:10]:>10}" for j in order))
    for i in order:
        lines.append(f"  {result.algorithms[i].ljust(width)}" +
                     "".join(f"  {'-' if i == j else format(result.pairwise_p[i, j], '.4f'):>10}"
                             for j in order))
    return "\n".join(lines) + "\n"


def cd_diagram_png(result: SignificanceResult, title: Optional[str] = None, dpi: int = 150) -> bytes:
    """Demšar's critical-difference diagram as PNG bytes: the average-rank axis (1 = best, on
    the left), each algorithm's rank, the CD for scale, and thick bars joining the groups
    without significant differences."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, ranks = result.algorithms, np.asarray(result.average_ranks)
    k = len(names)
    order = list(np.argsort(ranks, kind="stable"))
    n_left = (k + 1) // 2
    left, right = order[:n_left], order[n_left:][::-1]
    labels = {i: f"{names[i]} ({ranks[i]:.2f})" for i in range(k)}
    side = 0.3 + 0.075 * max(len(s) for s in labels.values())
    axis_len = min(max(0.9 * (k - 1), 3.0), 7.0)
    top = 0.6 + (0.35 if title else 0.0)
    bars = [(min(ranks[names.index(a)] for a in g), max(ranks[names.index(a)] for a in g))
            for g in result.cliques]
    first_row = top + 0.2 + 0.12 * len(bars) + 0.1
    height = first_row + 0.25 * max(len(left), len(right)) + 0.15
    width = axis_len + 2 * side

    def x(rank: float) -> float:
        return side + (rank - 1) / (k - 1) * axis_len

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    if title:
        ax.text(width / 2, 0.2, title, ha="center", va="center", fontsize=10)
    _rank_axis(ax, x, k, top, result.critical_difference)
    for row, i in enumerate(left):
        y = first_row + 0.25 * row
        ax.plot([x(ranks[i]), x(ranks[i]), side - 0.1], [top, y, y], color="black", lw=0.8)
        ax.text(side - 0.15, y, labels[i], ha="right", va="center", fontsize=9)
    for row, i in enumerate(right):
        y = first_row + 0.25 * row
        ax.plot([x(ranks[i]), x(ranks[i]), side + axis_len + 0.1], [top, y, y], color="black", lw=0.8)
        ax.text(side + axis_len + 0.15, y, labels[i], ha="left", va="center", fontsize=9)
    for j, (lo, hi) in enumerate(bars):
        y = top + 0.2 + 0.12 * j
        ax.plot([x(lo) - 0.04, x(hi) + 0.04], [y, y], color="black", lw=3.5, solid_capstyle="butt")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _rank_axis(ax, x: Callable[[float], float], k: int, top: float, cd: float) -> None:
    """The average-rank axis from 1 to k at height `top`, and above it the CD for scale."""
    ax.plot([x(1), x(k)], [top, top], color="black", lw=1)
    for r in np.arange(1, k + 0.5, 0.5):
        tick = 0.1 if float(r).is_integer() else 0.05
        ax.plot([x(r), x(r)], [top - tick, top], color="black", lw=1)
        if float(r).is_integer():
            ax.text(x(r), top - 0.13, str(int(r)), ha="center", va="bottom", fontsize=8)
    cd_end = min(1 + cd, k)
    cd_y = top - 0.4
    ax.plot([x(1), x(cd_end)], [cd_y, cd_y], color="black", lw=1)
    for end in (1, cd_end):
        ax.plot([x(end), x(end)], [cd_y - 0.04, cd_y + 0.04], color="black", lw=1)
    ax.text((x(1) + x(cd_end)) / 2, cd_y - 0.05, f"CD = {cd:.2f}"
            + (" (beyond the axis)" if cd_end < 1 + cd else ""), ha="center", va="bottom", fontsize=8)
