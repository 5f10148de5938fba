"""Single-source DG's report (Table 4 / Table 10): the selection protocol, the aggregation of runs
into tables, damaged and missing runs, and collect_single_source, on hand-built records and on
the committed results of real DomainBed runs (tests/data/single_source_debug28: a Debug28 sweep
of ERM and ITL, 2 trials x 2 hparams seeds, made by the launcher, plus DomainBed's own
multi-source sweep of the same algorithms in the same folder)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import collect_single_source, no_domainbed_env
from domainbed_itl.single_source import selection, tables
from domainbed_itl.files import sweepfolder as run_folders


FIXTURE = Path(__file__).resolve().parents[1] / "data" / "single_source_debug28"


def record(source=0, n=3, step=0, val=0.5, accs=None, dataset="D", algorithm="ERM", trial=0,
           hparams_seed=0, test_envs=None):
    """A DomainBed train record; `accs` gives every env's in-split accuracy."""
    accs = accs or [0.1 * (e + 1) for e in range(n)]
    if test_envs is None:
        test_envs = [e for e in range(n) if e != source]
    rec = {"args": {"dataset": dataset, "algorithm": algorithm, "trial_seed": trial,
                    "hparams_seed": hparams_seed, "task": "domain_generalization", "test_envs": test_envs},
           "step": step}
    for e in range(n):
        rec[f"env{e}_in_acc"] = accs[e]
        rec[f"env{e}_out_acc"] = val if e == source else 0.99  # targets' out-split: never used
    return rec


def grid(n=3, trials=(0, 1), seeds=(0, 1), algorithms=("ERM",), acc=lambda a, s, t, h: 0.5):
    """Finished runs for every (algorithm, source, trial, seed); one checkpoint each."""
    runs = []
    for a in algorithms:
        for s in range(n):
            for t in trials:
                for h in seeds:
                    value = acc(a, s, t, h)
                    runs.append(run_folders.JobFolder(f"{a}-{s}-{t}-{h}", [record(
                        s, n, val=0.5 + 0.01 * h, accs=[value] * n, algorithm=a, trial=t,
                        hparams_seed=h)], True))
    return runs


# ---------------------------------------------------------------- selection protocol


def test_checkpoint_selection_uses_the_source_validation_split():
    records = [record(step=0, val=0.3, accs=[0.2, 0.9, 0.9]),
               record(step=100, val=0.8, accs=[0.9, 0.4, 0.5]),
               record(step=200, val=0.8, accs=[0.9, 0.1, 0.1]),
               record(step=300, val=0.6, accs=[0.9, 0.95, 0.95])]
    assert selection.select_checkpoint(records, 0)["step"] == 100  # best val, earliest of the tie
    chosen = selection.select_model({0: records}, 0)
    assert (chosen.step, chosen.val_acc, chosen.target_accs) == (100, 0.8, {1: 0.4, 2: 0.5})


def test_hparams_selection_takes_the_best_validation_over_seeds_and_checkpoints():
    runs = {0: [record(step=0, val=0.7, accs=[0, 0.6, 0.6], hparams_seed=0)],
            1: [record(step=0, val=0.6, accs=[0, 0.9, 0.9], hparams_seed=1),
                record(step=5, val=0.75, accs=[0, 0.3, 0.2], hparams_seed=1)],
            2: [record(step=0, val=0.75, accs=[0, 0.1, 0.1], hparams_seed=2)]}
    chosen = selection.select_model(runs, 0)
    assert (chosen.hparams_seed, chosen.step) == (1, 5)  # tie at 0.75: the lower seed
    assert chosen.target_accs == {1: 0.3, 2: 0.2}
    source2 = selection.select_model({0: [record(source=2, val=0.4, accs=[0.11, 0.22, 0.33])]}, 2)
    assert source2.target_accs == {0: 0.11, 1: 0.22}


def test_mean_and_error_is_domainbeds_format_mean():
    mean, err = selection.mean_and_error([0.5, 0.7])
    assert mean == pytest.approx(60.0) and err == pytest.approx(100 * 0.1 / np.sqrt(2))
    data = [0.61, 0.58, 0.66]
    assert selection.mean_and_error(data) == pytest.approx(
        (100 * np.mean(data), 100 * np.std(list(data) / np.sqrt(len(data)))))  # DomainBed's formula
    assert selection.mean_and_error([0.25]) == (25.0, 0.0)


def test_source_of_single_and_multi_source_records():
    assert run_folders.source_of(record(source=1, n=4)) == 1
    assert run_folders.source_of(record(n=4, test_envs=[3])) is None
    assert run_folders.count_envs(record(n=6)) == 6
    with pytest.raises(ValueError, match=r"test_envs \[3\] is not single-source"):
        run_folders.run_key(record(n=4, test_envs=[3]))


# ---------------------------------------------------------------- aggregation and report


def test_complete_grid_cells_and_tables():
    acc = {(0, 0): 0.50, (0, 1): 0.60, (1, 0): 0.70, (1, 1): 0.80, (2, 0): 0.20, (2, 1): 0.40}
    results = selection.summarise(grid(trials=(0, 1), seeds=(0,), acc=lambda a, s, t, h: acc[s, t]))
    assert results.problems == [] and results.n_runs == 6 == results.n_complete_runs
    cell = results.cells["D", "ERM", 1]
    assert cell.targets == (0, 2) and cell.complete
    assert tables.format_cell(cell) == "75.0/75.0 75.0 +/- 3.5"  # SE: 5.0 / sqrt(2)
    means, expected = results.dataset_trial_means("D", "ERM")
    assert expected == 2 and means == pytest.approx({0: (0.5 + 0.7 + 0.2) / 3, 1: (0.6 + 0.8 + 0.4) / 3})
    report = tables.render_report(results)
    assert re.search(r"^ERM\s+55\.0/55\.0 55\.0 \+/- 3\.5\s+75\.0/75\.0 75\.0 \+/- 3\.5\s+"
                     r"30\.0/30\.0 30\.0 \+/- 7\.1\s+53\.3 \+/- 4\.7$", report, flags=re.M), report
    assert re.search(r"^ERM\s+53\.3 \+/- 4\.7\s+53\.3$", report, flags=re.M), report
    assert "0 -> 1/2" in report and "2 -> 0/1" in report and "WARNING" not in report


def test_target_accuracies_are_listed_in_target_order():
    runs = [run_folders.JobFolder(f"r{s}", [record(source=s, accs=[0.11, 0.22, 0.33])], True)
            for s in range(3)]
    results = selection.summarise(runs)
    assert [tables.format_cell(results.cells["D", "ERM", s]) for s in range(3)] == [
        "22.0/33.0 27.5 +/- 0.0", "11.0/33.0 22.0 +/- 0.0", "11.0/22.0 16.5 +/- 0.0"]


def test_missing_and_unfinished_runs_are_named_never_averaged():
    runs = [r for r in grid() if r.folder != "ERM-1-1-0"]  # source 1, trial 1, seed 0: no folder
    unfinished = next(r for r in runs if r.folder == "ERM-2-0-1")
    unfinished.done = False
    unfinished.records[0]["env2_out_acc"] = 1.0  # would win the selection if it were used
    results = selection.summarise(runs)
    assert results.problems == [
        "D/ERM source 1 trial 1 hparams_seed 0: no job folder",
        "D/ERM source 2 trial 0 hparams_seed 1: folder ERM-2-0-1 has no `done` marker (still "
        "running, or failed)"]
    assert sorted(results.cells["D", "ERM", 1].selections) == [0]
    assert sorted(results.cells["D", "ERM", 2].selections) == [1]
    assert tables.format_cell(results.cells["D", "ERM", 1]).endswith(" [1/2 trials]")
    assert tables.format_cell(results.cells["D", "ERM", 0]).endswith("+/- 0.0")
    means, expected = results.dataset_trial_means("D", "ERM")
    assert means == {} and expected == 2
    report = tables.render_report(results)
    assert "WARNING: 2 missing or incomplete runs" in report
    assert re.search(r"^ERM\s+X \[0/2 trials\]\s+X$", report, flags=re.M), report
    assert report.rstrip().endswith("has no `done` marker (still running, or failed)")


def test_multi_source_records_are_counted_and_ignored():
    multi = [run_folders.JobFolder(f"m{t}", [record(n=3, test_envs=[t], step=s) for s in (0, 1)], True)
             for t in range(3)]
    alone = selection.summarise(grid())
    mixed = selection.summarise(grid() + multi)
    assert (mixed.ignored_multi_source_runs, mixed.ignored_multi_source_records) == (3, 6)
    assert mixed.cells.keys() == alone.cells.keys()
    assert all(mixed.cells[k].selections == alone.cells[k].selections for k in alone.cells)
    assert "ignored multi-source runs: 3 (6 records)" in tables.render_report(mixed)


def test_manifest_names_folders_without_records(tmp_path):
    runs = grid(seeds=(0,))
    empty = run_folders.JobFolder("f-empty", [], False)
    stray = run_folders.JobFolder("f-stray", [], False)
    planned = [run_folders.PlannedJob("f-empty", run_folders.RunKey("D", "ERM", 0, 2, 0), 3),
               run_folders.PlannedJob("f-gone", run_folders.RunKey("D", "ITL", 1, 0, 0), 3)]
    run_folders.update_manifest(tmp_path, planned[:1])
    run_folders.update_manifest(tmp_path, planned[1:])
    assert sorted(run_folders.read_manifest(tmp_path), key=lambda j: j.folder) == planned
    results = selection.summarise(runs + [empty, stray], run_folders.read_manifest(tmp_path))
    problems = "\n".join(results.problems)
    assert "D/ERM source 0 trial 2 hparams_seed 0: folder f-empty has no `done` marker" in problems
    assert "folder f-stray: no results.jsonl records and not in the sweep manifest" in problems
    assert "D/ITL source 1 trial 0 hparams_seed 0: its folder f-gone is missing" in problems
    for s in (0, 2):  # ITL was planned for source 1 only, but the protocol needs every source
        assert f"D/ITL source {s} trial 0 hparams_seed 0: no job folder" in problems
    # trial 2 is expected for every ERM source now, and only source 0 has a folder for it
    assert "D/ERM source 1 trial 2 hparams_seed 0: no job folder" in problems
    assert tables.format_cell(results.cells["D", "ITL", 1]) == "X [0/1 trials]"


def test_duplicate_runs_and_foreign_records_are_reported():
    runs = grid(seeds=(0,), trials=(0,))
    runs.append(run_folders.JobFolder("copy", [record(source=0)], True))
    runs.append(run_folders.JobFolder("junk", [{"hello": 1}], True))
    uda = dict(record(), args={**record()["args"], "task": "domain_adaptation"})
    runs.append(run_folders.JobFolder("uda", [uda], True))
    results = selection.summarise(runs)
    assert any(p.startswith("D/ERM source 0 trial 0 hparams_seed 0: ambiguous: folders ERM-0-0-0, copy")
               for p in results.problems)
    assert any("folder junk: its records are not DomainBed train records" in p for p in results.problems)
    assert results.ignored_other == ["folder uda: task domain_adaptation"]
    assert results.cells["D", "ERM", 0].selections == {}


def test_load_runs_tolerates_a_job_writing_its_last_line(tmp_path):
    (tmp_path / "a").mkdir()
    line = json.dumps(record())
    (tmp_path / "a" / "results.jsonl").write_text(line + "\n" + line[:40])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.jsonl").write_text(line[:40] + "\n" + line + "\n")
    (tmp_path / "b" / "done").write_text("done")
    (tmp_path / "results.txt").write_text("DomainBed's collect_results writes files here")
    (tmp_path / "submitit").mkdir()  # the submitit launcher's logs: not a job
    (tmp_path / ("0" * 32)).mkdir()  # a job folder made by Job.launch, its job not started
    not_started, a, b = run_folders.load_runs(tmp_path)  # sorted by name
    assert (not_started.folder, not_started.records, not_started.done) == ("0" * 32, [], False)
    assert (a.folder, len(a.records), a.done, a.error, a.skipped) == ("a", 1, False, None, [])
    assert (b.folder, len(b.records), b.error) == ("b", 1, None)  # the damaged line is skipped
    assert b.skipped == [f"{tmp_path / 'b' / 'results.jsonl'}:1: not JSON"]
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        run_folders.load_runs(tmp_path / "nope")


@pytest.mark.parametrize("damage, problem", [
    (42, "not a JSON object but 42"),
    ({"args": {}}, "lacks step, args.dataset, args.algorithm"),
    ({"step": True, "args": record()["args"]}, "step: input should be a valid integer (got True)"),
    ({"step": 0}, "lacks args"),
    ({"step": 0, "args": {"dataset": "D"}}, "lacks args.algorithm, args.test_envs"),
    ({"step": 0, "args": {**record()["args"], "test_envs": "1,2"}},
     "args.test_envs: input should be a valid list (got '1,2')"),
    ({**record(), "env1_in_acc": "high"}, "env1_in_acc missing or not accuracies in [0, 1]"),
    ({**record(), "env1_in_acc": 1.5}, "env1_in_acc missing or not accuracies in [0, 1]"),
    ({**record(), "env1_in_acc": float("nan")}, "env1_in_acc missing or not accuracies"),
    ({"step": 0, "args": record()["args"]}, "no env<i>_out_acc accuracies for 2 or more domains"),
])
def test_record_problems_are_named(damage, problem):
    assert run_folders.record_problem(record()) is None
    assert problem in run_folders.record_problem(damage)


def _damaged_copy(tmp_path):
    """The committed sweep with three damaged records in one run and a truncated manifest."""
    copy = tmp_path / "sweep"
    shutil.copytree(FIXTURE, copy)
    job = next(j for j in run_folders.read_manifest(copy)
               if j.key == run_folders.RunKey("Debug28", "ITL", 1, 0, 1))
    results = copy / job.folder / "results.jsonl"
    lines = results.read_text().splitlines()
    no_step = json.loads(lines[1])
    del no_step["step"]
    results.write_text("\n".join([lines[0], "42", json.dumps(no_step), "{not json", *lines[2:]]) + "\n")
    manifest = copy / run_folders.MANIFEST_NAME
    manifest.write_text(manifest.read_text()[:200])
    return copy, results


def test_damaged_records_and_manifest_are_listed_and_skipped(tmp_path):
    copy, results = _damaged_copy(tmp_path)
    with pytest.raises(ValueError, match=rf"{run_folders.MANIFEST_NAME}:\d+: the sweep manifest is not "
                                         r"valid JSON .*; move it aside"):
        run_folders.update_manifest(copy, [])  # the launcher never drops a manifest's entries
    result = collect_single_source("--input_dir", str(copy), env=no_domainbed_env())
    assert result.returncode == 0 and result.stderr == ""
    out = result.stdout
    assert "WARNING: 4 damaged records or manifest entries could not be read and were skipped" in out
    tail = out[out.index("Skipped damaged records (4):"):].splitlines()[1:]
    assert tail[0].startswith(f"  {copy / run_folders.MANIFEST_NAME}:") and "not valid JSON" in tail[0]
    assert tail[1:] == [f"  {results}:2: not a JSON object but 42",
                        f"  {results}:3: lacks step", f"  {results}:4: not JSON"]
    # The damaged run keeps its readable records, so every cell is still there.
    assert "missing or incomplete" not in out and re.search(r"^ITL\s+\d", out, flags=re.M), out
    sig = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.significance",
                          "--single_source_dir", str(copy), "--output_dir", str(tmp_path / "sig")],
                         capture_output=True, text=True, timeout=300, env=no_domainbed_env())
    assert sig.returncode == 0, sig.stderr
    assert f"single-source: skipped 4 damaged records or manifest entries: {copy}" in sig.stdout
    assert f"{results}:2: not a JSON object but 42" in sig.stdout


def test_formats_and_ordering():
    results = selection.summarise(grid(algorithms=("ITL", "ERM")))
    latex = tables.render_report(results, "latex", algorithms=["ITL", "ERM"],
                             env_names={"D": ["Art", "Cartoon", "Photo"]})
    assert "\\begin{tabular}{lcccc}" in latex and "$\\pm$" in latex
    assert "\\textbf{Art -> Cartoon/Photo}" in latex
    assert latex.index("\nITL &") < latex.index("\nERM &")
    markdown = tables.render_report(results, "markdown")
    assert "| Algorithm | 0 -> 1/2 | 1 -> 0/2 | 2 -> 0/1 | Avg |" in markdown
    assert "| ERM | 50.0/50.0 50.0 ± 0.0 |" in markdown
    with pytest.raises(ValueError, match="algorithm 'SagNet' not in the results; they hold ERM, ITL"):
        tables.render_report(results, algorithms=["ERM", "SagNet"])
    with pytest.raises(ValueError, match="D has 3 domains in the records but 2 names"):
        tables.render_report(results, env_names={"D": ["a", "b"]})
    with pytest.raises(ValueError, match="unknown format 'html'"):
        tables.render_report(results, "html")


def test_scores_for_significance_use_complete_cells_only():
    runs = grid(algorithms=("ERM", "ITL"), acc=lambda a, s, t, h: 0.5 if a == "ERM" else 0.6 + 0.1 * s)
    runs = [r for r in runs if r.folder != "ITL-2-1-1"]
    results = selection.summarise(runs)
    by_domain = results.scores("domain", ["ERM", "ITL"], ["D"], {"D": ["a", "b", "c"]})
    assert by_domain == {"D:a": {"ERM": 0.5, "ITL": pytest.approx(0.6)},
                         "D:b": {"ERM": 0.5, "ITL": pytest.approx(0.7)}, "D:c": {"ERM": 0.5}}
    pairs = results.scores("pair", ["ERM", "ITL"], ["D"])
    assert len(pairs) == 6 and pairs["D:0->1"] == {"ERM": 0.5, "ITL": pytest.approx(0.6)}
    assert results.scores("dataset", ["ERM", "ITL"], ["D"]) == {"D": {"ERM": 0.5}}
    with pytest.raises(ValueError, match="unknown block level 'target'"):
        results.scores("target", ["ERM"], ["D"])


# ---------------------------------------------------------------- the committed real runs


def _fixture_results():
    return selection.summarise(run_folders.load_runs(FIXTURE), run_folders.read_manifest(FIXTURE))


def test_fixture_of_real_domainbed_runs():
    results = _fixture_results()
    assert results.problems == [] and results.ignored_other == []
    assert results.n_runs == results.n_complete_runs == 24  # 2 algorithms x 3 sources x 2 x 2
    assert results.ignored_multi_source_runs == 12  # DomainBed's own sweep: 2 x 3 test envs x 2 trials
    assert sorted(results.cells) == [("Debug28", a, s) for a in ("ERM", "ITL") for s in range(3)]
    # Selection, recomputed independently from the raw files.
    raw = {}
    for path in FIXTURE.glob("*/results.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if len(r["args"]["test_envs"]) == 2:
                (source,) = {0, 1, 2} - set(r["args"]["test_envs"])
                raw.setdefault((r["args"]["algorithm"], source, r["args"]["trial_seed"]), []).append(r)
    assert len(raw) == 12
    for (algorithm, source, trial), records in raw.items():
        assert {r["step"] for r in records} == {0, 2, 4}
        best = min(records, key=lambda r: (-r[f"env{source}_out_acc"], r["args"]["hparams_seed"], r["step"]))
        chosen = results.cells["Debug28", algorithm, source].selections[trial]
        assert (chosen.hparams_seed, chosen.step) == (best["args"]["hparams_seed"], best["step"])
        assert chosen.target_accs == {t: best[f"env{t}_in_acc"] for t in range(3) if t != source}




def test_report_command_on_the_fixture_without_domainbed(tmp_path):
    result = collect_single_source("--input_dir", str(FIXTURE), env=no_domainbed_env())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ignored multi-source runs: 12 (24 records)" in out and "WARNING" not in out
    results = _fixture_results()
    for algorithm in ("ERM", "ITL"):
        cells = [tables.format_cell(results.cells["Debug28", algorithm, s]) for s in range(3)]
        assert re.search(rf"^{algorithm}\s+" + r"\s+".join(map(re.escape, cells)), out, flags=re.M), out
        for cell in cells:  # every source x target: two target accuracies, mean +/- SE
            assert re.fullmatch(r"\d+\.\d/\d+\.\d \d+\.\d \+/- \d+\.\d", cell)
    written = tmp_path / "table.md"
    md = collect_single_source("--input_dir", str(FIXTURE), "--markdown", "--output", str(written),
                  env=no_domainbed_env())
    assert md.returncode == 0 and written.read_text() == md.stdout
    again = collect_single_source("--input_dir", str(FIXTURE), "--output", str(written),
                                  env=no_domainbed_env())
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    assert written.read_text() == md.stdout and again.stdout == ""
    assert collect_single_source("--input_dir", str(FIXTURE), "--output", str(written), "--overwrite",
                    env=no_domainbed_env()).returncode == 0
    assert "-------- Table 4" in written.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]  # no temporary file left


def test_report_command_names_a_run_that_lost_its_done_marker(tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(FIXTURE, copy)
    key = run_folders.RunKey("Debug28", "ITL", 1, 0, 1)
    job = next(j for j in run_folders.read_manifest(copy) if j.key == key)
    (copy / job.folder / "done").unlink()
    shutil.rmtree(copy / next(j.folder for j in run_folders.read_manifest(copy)
                              if j.key == run_folders.RunKey("Debug28", "ERM", 2, 1, 0)))
    out = collect_single_source("--input_dir", str(copy), env=no_domainbed_env()).stdout
    assert "WARNING: 2 missing or incomplete runs" in out
    assert f"Debug28/ITL source 1 trial 0 hparams_seed 1: folder {job.folder} has no `done` marker" in out
    assert "Debug28/ERM source 2 trial 1 hparams_seed 0: its folder " in out
    assert re.search(r"^ITL\s+.*\[1/2 trials\].*\[1/2 trials\]$", out, flags=re.M), out
    bad = collect_single_source("--input_dir", str(tmp_path / "missing"), env=no_domainbed_env())
    assert bad.returncode == 2 and "is not a folder" in bad.stderr
