"""The figures read at a glance (scripts/plot_meta.py): whole outer steps on integer ticks,
reference lines with legends saying what a good value is, and a title naming the run. The test
reads the figure's artists (matplotlib's Agg backend), not its pixels."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from domainbed_itl.scripts import plot_meta  # noqa: E402


def _records(n=4, reference=True):
    records = []
    for step in range(1, n + 1):
        record = {"step": step, "inner_source_acc": 0.5 + 0.05 * step, "outer_heldout_acc": 0.4,
                  "outer_heldout_loss": 1.5 - 0.1 * step, "time_step_s": 1.0,
                  "solver_residual": 0.5 / step, "inner_grad_norm_ratio": 0.3 / step}
        if reference and step % 2 == 0:
            record["reference"] = {"cosine": 0.9}
        records.append(record)
    return records


def _figure(monkeypatch, tmp_path, records, argv=()):
    """Run the command on `records` and keep the figure it drew (before it is closed)."""
    kept = []
    monkeypatch.setattr(plot_meta.plt, "close", kept.append)
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_meta.main([str(run / "metrics.jsonl"), "--output", str(run / "c.png"), *argv]) == 0
    assert (run / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = kept
    return fig


def test_outer_steps_get_integer_ticks_and_the_title_names_the_run(monkeypatch, tmp_path, capsys):
    fig = _figure(monkeypatch, tmp_path, _records(4))
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
    assert fig._suptitle.get_text() == "meta-training run my-run: 4 outer steps"
    assert "wrote " in capsys.readouterr().out
    plt.close(fig)


def test_stationarity_and_trust_panels_have_reference_lines_with_legends(monkeypatch, tmp_path):
    fig = _figure(monkeypatch, tmp_path, _records(3), ["--title", "named by hand"])
    assert fig._suptitle.get_text() == "named by hand"
    panels = {ax.get_title(): ax for ax in fig.axes}
    stationarity = panels["stationarity of the inner networks"]
    lines = {line.get_label(): line for line in stationarity.get_lines()}
    legend = [t.get_text() for t in stationarity.get_legend().get_texts()]
    ratio = plot_meta.STATIONARY_RATIO
    assert set(legend) == set(lines)
    assert list(lines["1: no closer than at the start"].get_ydata()) == [1.0, 1.0]
    assert list(lines[f"{ratio:g}: where the stationary preset stops"].get_ydata()) == [ratio, ratio]
    trust = panels["hypergradient trust"]
    labels = [t.get_text() for t in trust.get_legend().get_texts()]
    assert "residual 1: no better than no solve" in labels
    assert "cosine 1: the reference's direction" in labels
    residual = {line.get_label(): line for line in trust.get_lines()}
    assert list(residual["residual 1: no better than no solve"].get_ydata()) == [1.0, 1.0]
    plt.close(fig)


def test_runs_without_diagnostics_draw_the_curves_only(monkeypatch, tmp_path):
    records = [{k: v for k, v in r.items() if k not in ("solver_residual", "inner_grad_norm_ratio")}
               for r in _records(2, reference=False)]
    fig = _figure(monkeypatch, tmp_path, records)
    assert [ax.get_title() for ax in fig.axes] == ["accuracy", "held-out loss M"]
    assert fig._suptitle.get_text() == "meta-training run my-run: 2 outer steps"
    plt.close(fig)
