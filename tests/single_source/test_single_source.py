"""Single-source DG: the launcher, the Table 4 / Table 10 report and its selection protocol.

Without DomainBed: hand-built records, and the committed results of real DomainBed runs
(tests/data/single_source_debug28: a Debug28 sweep of ERM and ITL, 2 trials x 2 hparams seeds,
made by this launcher, plus DomainBed's own multi-source sweep of the same algorithms in the
same folder). With DomainBed (DOMAINBED_ROOT): real sweeps end to end.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, domainbed_env
from domainbed_itl.bridge.domainbed_env import with_pythonpath
from domainbed_itl.single_source import planning, selection, tables
from domainbed_itl.files import sweepfolder as run_folders
from domainbed_itl.files.running_jobs import RUNNING_MARKER, mark_running
from domainbed_itl.scripts import single_source_sweep as sweep

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
    result = _collect("--input_dir", str(copy), env=_no_domainbed_env())
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
                         capture_output=True, text=True, timeout=300, env=_no_domainbed_env())
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


def _collect(*args, env=None):
    return subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.collect_single_source", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def _no_domainbed_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return env


def test_report_command_on_the_fixture_without_domainbed(tmp_path):
    result = _collect("--input_dir", str(FIXTURE), env=_no_domainbed_env())
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
    md = _collect("--input_dir", str(FIXTURE), "--markdown", "--output", str(written),
                  env=_no_domainbed_env())
    assert md.returncode == 0 and written.read_text() == md.stdout
    again = _collect("--input_dir", str(FIXTURE), "--output", str(written), env=_no_domainbed_env())
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    assert written.read_text() == md.stdout and again.stdout == ""
    assert _collect("--input_dir", str(FIXTURE), "--output", str(written), "--overwrite",
                    env=_no_domainbed_env()).returncode == 0
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
    out = _collect("--input_dir", str(copy), env=_no_domainbed_env()).stdout
    assert "WARNING: 2 missing or incomplete runs" in out
    assert f"Debug28/ITL source 1 trial 0 hparams_seed 1: folder {job.folder} has no `done` marker" in out
    assert "Debug28/ERM source 2 trial 1 hparams_seed 0: its folder " in out
    assert re.search(r"^ITL\s+.*\[1/2 trials\].*\[1/2 trials\]$", out, flags=re.M), out
    bad = _collect("--input_dir", str(tmp_path / "missing"), env=_no_domainbed_env())
    assert bad.returncode == 2 and "is not a folder" in bad.stderr


# ---------------------------------------------------------------- launcher logic (no DomainBed)


def _fake_domainbed(n_envs):
    datasets = SimpleNamespace(DATASETS=list(n_envs), num_environments=lambda d: n_envs[d])
    algorithms = SimpleNamespace(ALGORITHMS=["ERM", "CORAL"])
    return datasets, algorithms


def _args(tmp_path, **overrides):
    args = sweep.build_parser().parse_args(
        ["launch", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
         "--command_launcher", "local"])
    args.datasets, args.algorithms = ["Three"], ["ERM"]
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("overrides, message", [
    ({"datasets": ["Nope"]}, "unknown dataset 'Nope'; DomainBed knows: Three, One"),
    ({"datasets": ["One"]}, "dataset 'One' has 1 domain; single-source DG needs at least 2"),
    ({"algorithms": ["Foo"]}, "unknown algorithm 'Foo'; DomainBed knows: ERM, CORAL"),
    ({"algorithms": ["ITL"]}, "algorithm 'ITL' is domainbed-itl's, and the DomainBed checkout /db does "
                              "not have our patches: python -m domainbed_itl.scripts.patch apply"),
    ({"command_launcher": "slurmish"},
     "unknown --command_launcher 'slurmish'; expected one of local, submitit"),
    ({"submitit_partition": "gpu"}, "--submitit_partition only apply with --command_launcher submitit"),
    ({"n_trials": 0}, "--n_trials must be at least 1, got 0"),
    ({"n_hparams_from": 3, "n_hparams": 3}, "need 0 <= n_hparams_from < n_hparams, got 3 and 3"),
    ({"steps": 0}, "--steps must be at least 1, got 0"),
    ({"holdout_fraction": 1.0}, "--holdout_fraction must be between 0 and 1 (exclusive)"),
    ({"hparams": "{batch_size: 8}"}, "--hparams '{batch_size: 8}' is not JSON"),
    ({"hparams": "[8]"}, "--hparams must be a JSON object"),
    ({"sources": [3]}, "--sources 3 is not a domain of 'Three', whose domains are 0..2"),
])
def test_launcher_rejects_bad_input_by_name(tmp_path, overrides, message):
    datasets, algorithms = _fake_domainbed({"Three": 3, "One": 1})
    with pytest.raises(sweep.SweepInputError) as error:
        sweep.validate(_args(tmp_path, **overrides), datasets, algorithms, {"local": print}, Path("/db"))
    assert message in str(error.value)


def _absurd_loss_file(tmp_path):
    path = tmp_path / "absurd.json"  # finite parameters, as a loss file may hold them
    path.write_text(json.dumps({"family": "taylor", "order": 4, "parameters": [1e30] * 12}))
    return str(path)


@pytest.mark.parametrize("algorithm, hparams, message", [
    ("ITL", {"itl_loss": "no/such/loss.json"},
     "--hparams: algorithm ITL: hparam itl_loss='no/such/loss.json' is neither a preset loss nor "
     "an existing file; expected a preset loss (ITL, learned-RotatedMNIST, stationary-RotatedMNIST) "
     "or the path of a loss file"),
    ("ITL", {"itl_loss": "absurd"}, "--hparams: algorithm ITL: the ITL loss of hparams itl_loss="),
    ("ERM_Focal", {"focal_gamma": -1}, "--hparams: algorithm ERM_Focal: hparam focal_gamma=-1: "
                                       "expected a number >= 0"),
    ("ERM_SCE", {"sce_beta": -0.5}, "SCE weights alpha=0.1, beta=-0.5: expected both >= 0"),
])
def test_launcher_checks_the_losses_before_launching(tmp_path, algorithm, hparams, message):
    datasets, algorithms = _fake_domainbed({"RotatedMNIST": 6})
    algorithms.ALGORITHMS.append(algorithm)
    if hparams.get("itl_loss") == "absurd":
        hparams = {"itl_loss": _absurd_loss_file(tmp_path)}
    args = _args(tmp_path, datasets=["RotatedMNIST"], algorithms=[algorithm],
                 hparams=json.dumps(hparams))
    with pytest.raises(sweep.SweepInputError) as error:
        sweep.validate(args, datasets, algorithms, {"local": print}, Path("/db"))
    assert message in str(error.value)
    if "absurd" in str(error.value):
        assert "is not finite" in str(error.value) and str(error.value).endswith(
            "(dataset RotatedMNIST)")


def test_launcher_checks_the_losses_before_looking_for_domainbed(tmp_path):
    """Nothing is needed to refuse a bad loss: not even DomainBed."""
    result = subprocess.run(
        [sys.executable, "-m", "domainbed_itl.scripts.single_source_sweep", "launch", "--algorithms",
         "ITL", "--hparams", '{"itl_loss": "typo.json"}', "--data_dir", str(tmp_path),
         "--output_dir", str(tmp_path / "out"), "--command_launcher", "local",
         "--domainbed_root", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=300, env=_no_domainbed_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: --hparams: algorithm ITL: hparam itl_loss='typo.json' is neither a preset loss nor "
        "an existing file; expected a preset loss (ITL, learned-RotatedMNIST, stationary-RotatedMNIST) "
        "or the path of a loss file"]
    assert not (tmp_path / "out").exists()


def test_launcher_rejects_a_missing_data_dir(tmp_path):
    datasets, algorithms = _fake_domainbed({"Three": 3})
    args = _args(tmp_path, data_dir=str(tmp_path / "no_data"))
    with pytest.raises(sweep.SweepInputError, match="--data_dir '.*no_data' is not a folder"):
        sweep.validate(args, datasets, algorithms, {"local": print}, Path("/db"))


def test_single_source_args_complement_the_test_env():
    args_list = [{"dataset": "Four", "algorithm": "ERM", "test_envs": [s], "hparams_seed": h,
                  "trial_seed": 0, "seed": -1} for s in range(4) for h in (0, 1)]
    seen = []

    def seed_hash(*values):
        seen.append(values)
        return len(seen)

    out = planning.single_source_args(args_list, lambda d: 4, seed_hash, sources=[1, 3], checkpoint_freq=7)
    assert [(a["test_envs"], s) for a, s in out] == [([0, 2, 3], 1)] * 2 + [([0, 1, 2], 3)] * 2
    assert seen[0] == ("Four", "ERM", [0, 2, 3], 0, 0)  # DomainBed's seed recipe, new test envs
    assert [a["seed"] for a, _ in out] == [1, 2, 3, 4] and all(a["checkpoint_freq"] == 7 for a, _ in out)
    assert args_list[2]["test_envs"] == [1]  # the input is not modified
    assert "checkpoint_freq" not in planning.single_source_args(args_list, lambda d: 4, seed_hash)[0][0]


def test_with_pythonpath_puts_the_checkout_first_once():
    environ = {"PYTHONPATH": os.pathsep.join(["/a", "/db", "/b"]), "OTHER": "x"}
    env = with_pythonpath(Path("/db"), environ)
    assert env == {"PYTHONPATH": os.pathsep.join(["/db", "/a", "/b"]), "OTHER": "x"}
    assert environ["PYTHONPATH"] == os.pathsep.join(["/a", "/db", "/b"])  # a copy: not modified
    assert with_pythonpath("/db", {}) == {"PYTHONPATH": "/db"}


def test_submitit_settings_come_from_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAINBED_SUBMITIT_MEM_GB", "64")
    built = {}
    monkeypatch.setattr(sweep, "make_submitit_launcher", lambda config: built.setdefault("config", config))
    args = _args(tmp_path, command_launcher="submitit", submitit_partition="gpu", submitit_cpus_per_task=4,
                 submitit_wait=False)
    sweep.make_launcher(args, {})
    config = built["config"]
    assert (config.partition, config.cpus_per_task, config.wait, config.mem_gb) == ("gpu", 4, False, 64)
    with pytest.raises(sweep.SweepInputError,
                       match="submitit cluster must be slurm, local or debug, got 'mars'"):
        sweep.make_launcher(_args(tmp_path, command_launcher="submitit", submitit_cluster="mars"), {})


def test_parser_has_domainbeds_sweep_flags():
    parser = sweep.build_parser()
    flags = {a.dest for a in parser._actions}
    assert {"datasets", "algorithms", "n_hparams_from", "n_hparams", "n_trials", "steps", "hparams",
            "holdout_fraction", "data_dir", "output_dir", "command_launcher", "skip_confirmation",
            "seed", "domainbed_root"} <= flags
    assert isinstance(parser.parse_args(["launch", "--data_dir", "d", "--output_dir", "o",
                                         "--command_launcher", "local"]), argparse.Namespace)


# ---------------------------------------------------------------- real DomainBed sweeps


def _launch(root, *args, check=True, env=None, timeout=600):
    result = subprocess.run(
        [sys.executable, "-m", "domainbed_itl.scripts.single_source_sweep", *args, "--domainbed_root",
         str(root)], capture_output=True, text=True, timeout=timeout, env=env or _no_domainbed_env())
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


DEBUG_SWEEP = ["--datasets", "Debug28", "--algorithms", "ERM", "ITL", "--n_hparams", "1",
               "--n_trials", "1", "--steps", "3", "--hparams", '{"batch_size": 8}',
               "--command_launcher", "local", "--skip_confirmation"]


@pytest.fixture(scope="module")
def debug_sweep(patched_domainbed, tmp_path_factory):
    """A real single-source sweep of ERM and ITL on Debug28 (6 jobs). The jobs find DomainBed
    only through the launcher's export of --domainbed_root: PYTHONPATH holds just this repo."""
    base = tmp_path_factory.mktemp("ss_sweep")
    out = base / "sweep"
    result = _launch(patched_domainbed, "launch", *DEBUG_SWEEP, "--data_dir", str(base),
                     "--output_dir", str(out))
    return patched_domainbed, base, out, result.stdout


@pytest.mark.slow
def test_debug28_sweep_runs_end_to_end(debug_sweep):
    root, base, out, stdout = debug_sweep
    assert "6 jobs: 0 done, 0 incomplete, 6 not launched." in stdout
    assert "About to launch 6 jobs." in stdout and "Launched 6 jobs!" in stdout
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 6 and all((p / "done").exists() for p in folders)
    records = [json.loads(line) for p in folders for line in (p / "results.jsonl").read_text().splitlines()]
    assert sorted({(r["args"]["algorithm"], tuple(r["args"]["test_envs"])) for r in records}) == [
        (a, t) for a in ("ERM", "ITL") for t in ((0, 1), (0, 2), (1, 2))]
    assert {r["hparams"]["batch_size"] for r in records} == {8}
    assert all(r["hparams"]["itl_loss"] == "ITL" for r in records if r["args"]["algorithm"] == "ITL")
    assert len(run_folders.read_manifest(out)) == 6
    # DomainBed's own collect_results reads the folder.
    collected = subprocess.run([sys.executable, "-m", "domainbed.scripts.collect_results", "--input_dir",
                                str(out)], capture_output=True, text=True, env=domainbed_env(root),
                               timeout=300)
    assert collected.returncode == 0 and "Total records: 12" in collected.stdout, collected.stderr


@pytest.mark.slow
def test_debug28_report_has_every_source_and_target(debug_sweep):
    root, base, out, _ = debug_sweep
    result = _collect("--input_dir", str(out), "--domainbed_root", str(root), env=_no_domainbed_env())
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stdout
    header = "Algorithm  0 -> 1/2"
    assert header in result.stdout and "1 -> 0/2" in result.stdout and "2 -> 0/1" in result.stdout
    for algorithm in ("ERM", "ITL"):
        cells = r"\s+".join([r"\d+\.\d/\d+\.\d \d+\.\d \+/- 0\.0"] * 3 + [r"\d+\.\d \+/- 0\.0"])
        assert re.search(rf"^{algorithm}\s+{cells}$", result.stdout, flags=re.M), result.stdout
        assert re.search(rf"^{algorithm}\s+\d+\.\d \+/- 0\.0\s+\d+\.\d$", result.stdout, flags=re.M)


@pytest.mark.slow
def test_relaunch_runs_only_what_is_missing(debug_sweep):
    root, base, out, _ = debug_sweep
    args = [*DEBUG_SWEEP, "--data_dir", str(base), "--output_dir", str(out)]
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    deleted, unfinished = folders[0], folders[1]
    shutil.rmtree(deleted)
    (unfinished / "done").unlink()
    mtimes = {p: (p / "results.jsonl").stat().st_mtime_ns for p in folders[2:]}

    relaunch = _launch(root, "launch", *args).stdout
    assert "6 jobs: 4 done, 1 incomplete, 1 not launched." in relaunch
    assert "About to launch 1 jobs." in relaunch and "Launched 1 jobs!" in relaunch
    assert (deleted / "done").exists() and not (unfinished / "done").exists()
    cleanup = _launch(root, "delete_incomplete", *args).stdout
    assert "6 jobs: 5 done, 1 incomplete, 0 not launched." in cleanup
    assert "About to delete 1 jobs." in cleanup and not unfinished.exists()
    again = _launch(root, "launch", *args).stdout
    assert "6 jobs: 5 done, 0 incomplete, 1 not launched." in again
    assert "About to launch 1 jobs." in again and (unfinished / "done").exists()
    assert {p: (p / "results.jsonl").stat().st_mtime_ns for p in folders[2:]} == mtimes


@pytest.mark.slow
def test_job_folders_hash_like_domainbeds_own_sweep(patched_domainbed, tmp_path):
    """On a 3-domain dataset DomainBed's full sweep includes every pair of test envs: the same
    jobs, so the same folders (same args, same seeds), as ours."""
    common = ["--datasets", "Debug28", "--algorithms", "ERM", "--n_hparams", "2", "--n_trials", "1",
              "--data_dir", str(tmp_path), "--command_launcher", "dummy", "--skip_confirmation"]
    _launch(patched_domainbed, "launch", *common, "--output_dir", str(tmp_path / "ours"))
    theirs = subprocess.run([sys.executable, "-m", "domainbed.scripts.sweep", "launch", *common,
                             "--output_dir", str(tmp_path / "theirs")], capture_output=True, text=True,
                            env=domainbed_env(patched_domainbed), timeout=300)
    assert theirs.returncode == 0, theirs.stderr
    ours = {p.name for p in (tmp_path / "ours").iterdir() if p.is_dir()}
    theirs = {p.name for p in (tmp_path / "theirs").iterdir()}
    assert len(ours) == 6 and len(theirs) == 12 and ours < theirs


@pytest.mark.slow
def test_launcher_errors_against_a_real_checkout(domainbed_root, tmp_path):
    clean = tmp_path / "DomainBed"
    shutil.copytree(domainbed_root, clean, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.patch", "revert", "--domainbed_root",
                    str(clean)], check=True, capture_output=True)
    common = ["launch", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
              "--command_launcher", "dummy", "--skip_confirmation"]
    unpatched = _launch(clean, *common, "--datasets", "Debug28", "--algorithms", "ERM", "ITL", check=False)
    assert unpatched.returncode == 2
    expected = (f"algorithm 'ITL' is domainbed-itl's, and the DomainBed checkout {clean.resolve()} does "
                f"not have our patches: python -m domainbed_itl.scripts.patch apply --domainbed_root "
                f"{clean.resolve()}")
    assert expected in unpatched.stderr
    nowhere = _launch(tmp_path, *common, check=False)
    assert nowhere.returncode == 2 and "is not a DomainBed checkout" in nowhere.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_jobs_that_fail_are_named_and_the_launch_exits_non_zero(patched_domainbed, tmp_path):
    """lr 1e30 drives ITL's loss to NaN: the jobs stop instead of finishing a run of NaNs
    marked `done`, and the launcher names them."""
    out = tmp_path / "sweep"
    result = _launch(patched_domainbed, "launch", "--datasets", "Debug28", "--algorithms", "ITL",
                     "--sources", "0", "--n_hparams", "1", "--n_trials", "1", "--steps", "5",
                     "--hparams", '{"batch_size": 8, "lr": 1e30}', "--command_launcher", "local",
                     "--skip_confirmation", "--data_dir", str(tmp_path), "--output_dir", str(out),
                     check=False, timeout=1800)
    assert result.returncode == 1, result.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert not (folder / "done").exists()
    lines = result.stderr.splitlines()
    assert "error: 1 of 1 launched jobs failed (no `done` marker)" in lines[-2]
    assert lines[-1].startswith(f"  Debug28/ITL source 0 trial 0 hparams_seed 0: {folder}: ")
    assert re.search(r"NonFiniteTrainingError: algorithm ITL: update \d+ returned loss = nan",
                     lines[-1]), lines[-1]


@pytest.mark.slow
def test_a_second_launcher_on_the_same_folder_is_refused(domainbed_root, locked_folder, tmp_path):
    result = _launch(domainbed_root, "launch", "--datasets", "Debug28", "--algorithms", "ERM",
                     "--n_hparams", "1", "--n_trials", "1", "--command_launcher", "dummy",
                     "--skip_confirmation", "--data_dir", str(tmp_path), "--output_dir",
                     str(locked_folder), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {locked_folder} is being written by another process (process ")
    assert f"command: holder --of {locked_folder}" in line
    assert [p.name for p in locked_folder.iterdir() if p.is_dir()] == []


@pytest.mark.slow
def test_rotated_mnist_single_source(patched_domainbed, mnist10k, tmp_path):
    """Real digits: ERM trained on the 0-degree domain only, tested on the five rotations."""
    out = tmp_path / "rmnist"
    _launch(patched_domainbed, "launch", "--datasets", "RotatedMNIST", "--algorithms", "ERM",
            "--sources", "0", "--n_hparams", "1", "--n_trials", "1", "--steps", "1",
            "--data_dir", str(mnist10k), "--output_dir", str(out), "--command_launcher", "local",
            "--skip_confirmation")
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    (rec,) = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert rec["args"]["test_envs"] == [1, 2, 3, 4, 5]
    report = _collect("--input_dir", str(out), "--domainbed_root", str(patched_domainbed),
                      env=_no_domainbed_env()).stdout
    targets = "/".join(f"{100 * rec[f'env{t}_in_acc']:.1f}" for t in range(1, 6))
    assert re.search(rf"^ERM\s+{re.escape(targets)} \d+\.\d \+/- 0\.0\s+X \[0/1 trials\]", report,
                     flags=re.M), report
    assert "0 -> 15/30/45/60/75" in report
    for source in range(1, 6):  # the protocol needs every source: the others are named as missing
        assert f"RotatedMNIST/ERM source {source} trial 0 hparams_seed 0: no job folder" in report


def _processes_naming(folder):
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
            if proc.name.isdigit() and folder.name in command:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_an_interrupted_sweep_stops_its_job_and_cleanup_never_removes_a_running_one(patched_domainbed,
                                                                                    tmp_path):
    """Ctrl-C (SIGINT to the process group) mid-job: the local launcher stops its DomainBed job
    (no orphan, no traceback); `delete_incomplete` then removes that job's folder, but keeps the
    folder of a job whose process still runs."""
    out = tmp_path / "sweep"
    args = ["--datasets", "Debug28", "--algorithms", "ERM", "--n_hparams", "1", "--n_trials", "1",
            "--steps", "300", "--hparams", '{"batch_size": 8}', "--command_launcher", "local",
            "--skip_confirmation", "--no_progress", "--data_dir", str(tmp_path), "--output_dir", str(out)]
    launch = subprocess.Popen([sys.executable, "-m", "domainbed_itl.scripts.single_source_sweep",
                               "launch", *args, "--domainbed_root", str(patched_domainbed)],
                              start_new_session=True, env=_no_domainbed_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline, started = time.monotonic() + 600, None
    while started is None:
        assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()
        started = next((p.parent for p in out.glob("*/results.jsonl")
                        if p.stat().st_size and not (p.parent / "done").exists()), None)
        time.sleep(0.05)
    os.killpg(launch.pid, signal.SIGINT)
    stdout, stderr = launch.communicate(timeout=120)
    assert launch.returncode == 130 and "interrupted: the running job was stopped" in stderr
    assert "Traceback" not in stdout + stderr
    assert _processes_naming(started) == [] and not (started / RUNNING_MARKER).exists()
    unfinished = [p for p in out.iterdir() if p.is_dir() and not (p / "done").exists()]

    still = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--output_dir",
                              str(started)])
    try:
        while started.name not in Path(f"/proc/{still.pid}/cmdline").read_bytes().decode():
            time.sleep(0.05)
        mark_running(started, still.pid)
        kept = _launch(patched_domainbed, "delete_incomplete", *args).stdout
        assert f"kept: {started} still runs (process {still.pid})" in kept and started.is_dir()
        assert f"About to delete {len(unfinished) - 1} jobs." in kept
    finally:
        still.kill()
        still.wait()
    cleared = _launch(patched_domainbed, "delete_incomplete", *args).stdout
    assert "About to delete 1 jobs." in cleared and not started.exists()
    assert not any(p.exists() for p in unfinished)
