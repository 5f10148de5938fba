"""Definitions of several stages (meta-train a loss, then sweep with it): parsing, commands, runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import domainbed_env

from domainbed_itl.experiments.paper import (Placeholders, SweepDefinitionError, build_commands,
                                             count_jobs, estimate_cost, format_command,
                                             load_experiment, parse_experiment, stage_output_dir)
from domainbed_itl.scripts import paper_sweep

COST = {"unit": "wall-minutes", "per_job": 1.0, "basis": "b"}


def _staged(**changes):
    meta = {"name": "meta", "runner": "meta_train",
            "paper": {"args": {"dataset": "synthetic", "outer_steps": 1, "resume": True}, "cost": COST},
            "reduced": {"args": {"dataset": "synthetic", "outer_steps": 1, "resume": True}, "cost": COST}}
    sweep_args = {"datasets": ["Debug28"], "algorithms": ["ITL"], "n_hparams": 1, "n_trials": 1,
                  "single_test_envs": True, "hparams": {"batch_size": 8, "itl_loss": "{meta}/loss.json"}}
    sweep = {"name": "sweep", "runner": "domainbed_sweep", "paper": {"args": sweep_args, "cost": COST},
             "reduced": {"args": dict(sweep_args, steps=1), "cost": COST}}
    data = {"title": "t", "reproduces": "r", "notes": "n", "stages": [meta, sweep]}
    data.update(changes)
    return data


def _sweep_hparams(command):
    return json.loads(command[command.index("--hparams") + 1])


def test_stages_run_in_subfolders_and_name_each_others_outputs(tmp_path):
    experiment = parse_experiment("x", _staged())
    assert [s.name for s in experiment.stages] == ["meta", "sweep"]
    assert count_jobs(experiment, reduced=True) == {None: 1, "Debug28": 3}
    assert estimate_cost(experiment, reduced=True) == (4.0, "wall-minutes")
    meta, sweep, collect = build_commands(experiment, True, Placeholders("/data", "/out", "local"))
    assert meta[meta.index("--output_dir") + 1] == "/out/meta" and "--resume" in meta
    assert sweep[sweep.index("--output_dir") + 1] == "/out/sweep"
    assert _sweep_hparams(sweep) == {"batch_size": 8, "itl_loss": "/out/meta/loss.json"}
    assert collect[-2:] == ["--input_dir", "/out/sweep"]
    # A relative output_dir is made absolute: DomainBed's jobs may start in another folder.
    os.chdir(tmp_path)
    _, sweep, _ = build_commands(experiment, True, Placeholders("/data", "rel", "local"))
    assert _sweep_hparams(sweep)["itl_loss"] == str(tmp_path / "rel" / "meta" / "loss.json")
    assert stage_output_dir("rel", None) == "rel"


def test_printed_commands_show_placeholders_for_what_is_not_given():
    experiment = parse_experiment("x", _staged())
    meta, sweep, _ = build_commands(experiment, False, Placeholders())
    assert _sweep_hparams(sweep)["itl_loss"] == "<output_dir>/meta/loss.json"
    assert format_command(meta).endswith("--data_dir <data_dir> --output_dir <output_dir>/meta")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["stages"][1]["paper"]["args"]["hparams"].update(itl_loss="{sweep}/loss.json"),
     "{sweep} in '{sweep}/loss.json' names no earlier stage; expected one of: meta"),
    (lambda d: d["stages"][1]["paper"]["args"]["hparams"].update(itl_loss="{mta}/loss.json"),
     "{mta} in '{mta}/loss.json' names no earlier stage"),
    (lambda d: d["stages"][0]["reduced"]["args"].update(init="{sweep}/loss.json"),
     "names no earlier stage; expected one of: (none: this is the first stage)"),
    (lambda d: d["stages"][1].update(name="meta"), "name 'meta' must be a new identifier"),
    (lambda d: d["stages"][1].update(name="a/b"), "name 'a/b' must be a new identifier"),
    (lambda d: d["stages"][1].update(after="meta"), "unknown key(s) after"),
    (lambda d: d["stages"][1]["reduced"].update(cost=dict(COST, unit="GPU-hours")),
     "the stages' reduced costs use different units (GPU-hours, wall-minutes)"),
    (lambda d: d.update(runner="meta_train"), "unknown key(s) runner"),
    (lambda d: d.update(stages=[]), "stages must be a non-empty array of tables"),
    (lambda d: d["stages"][0].pop("runner"), "[stage 1] (meta): missing key 'runner'"),
])
def test_bad_stages_are_refused_naming_the_problem(change, message):
    data = _staged()
    change(data)
    with pytest.raises(SweepDefinitionError) as error:
        parse_experiment("x", data, Path("x.toml"))
    assert message in str(error.value) and "x.toml" in str(error.value)


def test_a_one_stage_experiment_has_no_subfolder_and_a_staged_one_no_single_runner():
    one = load_experiment("table2_multi_source")
    assert [s.name for s in one.stages] == [None] and one.runner_name == "domainbed_sweep"
    staged = load_experiment("table6_task_specific")
    with pytest.raises(SweepDefinitionError,
                       match="has 3 stages; ask for one of meta, generic, task_specific"):
        staged.variant(reduced=True)


def test_table1_definition_meta_trains_isce_then_sweeps_with_its_loss():
    experiment = load_experiment("table1_erm_losses")
    assert [(s.name, s.runner_name) for s in experiment.stages] == [
        ("meta_sce", "meta_train"), ("losses", "domainbed_sweep"), ("isce", "domainbed_sweep")]
    meta, losses, _, isce, _ = build_commands(experiment, False, Placeholders("/d", "/o", "submitit"))
    text = " ".join(meta)
    assert "--family sce --dataset RotatedMNIST --outer_steps 200" in text and "--resume" in text
    assert losses[losses.index("--algorithms") + 1:losses.index("--n_hparams")] == [
        "ERM", "ERM_BCE", "ERM_SCE", "ITL"]
    assert _sweep_hparams(losses) == {"resnet18": True}
    assert isce[isce.index("--algorithms") + 1] == "ITL"
    assert _sweep_hparams(isce) == {"resnet18": True, "itl_loss": "/o/meta_sce/loss.json"}


def test_table6_definition_meta_trains_on_coloredmnist_then_sweeps_both_losses():
    experiment = load_experiment("table6_task_specific")
    meta, generic, _, specific, _ = build_commands(experiment, False, Placeholders("/d", "/o", "local"))
    assert "--dataset ColoredMNIST" in " ".join(meta) and "--family" not in meta  # Taylor, order 4
    assert "--hparams" not in generic and "ColoredMNIST" in generic
    assert _sweep_hparams(specific) == {"itl_loss": "/o/meta/loss.json"}


def test_fig6_definition_meta_trains_orders_2_to_5_then_evaluates_them_against_ce():
    experiment = load_experiment("fig6_taylor_order")
    assert [(s.name, s.runner_name) for s in experiment.stages] == [
        ("order2", "meta_train"), ("order3", "meta_train"), ("order4", "meta_train"),
        ("order5", "meta_train"), ("evaluate", "evaluate_loss")]
    for reduced in (False, True):
        *metas, evaluate = build_commands(experiment, reduced, Placeholders("/d", "/o", "local"))
        for order, meta in zip((2, 3, 4, 5), metas):
            assert meta[meta.index("--family") + 1] == f"taylor{order}"
            assert meta[meta.index("--preset") + 1] == "paper" and "--resume" in meta
            assert "--seed" not in meta  # one seed for every order
        assert evaluate[2:4] == ["domainbed_itl.scripts.evaluate_loss", "meta"]
        losses = evaluate[evaluate.index("--losses") + 1:evaluate.index("--dataset")]
        assert losses == ["CE"] + [f"order{k}=/o/order{k}/loss.json" for k in (2, 3, 4, 5)]
        assert evaluate[evaluate.index("--output_dir") + 1] == "/o/evaluate"


def test_table5_definition_meta_trains_five_seeds_then_sweeps_each_loss():
    experiment = load_experiment("table5_meta_seeds")
    names = [s.name for s in experiment.stages]
    assert names == [f"meta{k}" for k in range(5)] + [f"sweep{k}" for k in range(5)]
    commands = build_commands(experiment, False, Placeholders("/d", "/o", "submitit"))
    metas, sweeps = commands[:5], commands[5::2]
    assert [m[m.index("--seed") + 1] for m in metas] == ["0", "1", "2", "3", "4"]
    assert all(m[m.index("--preset") + 1] == "paper" for m in metas)
    for k, sweep in enumerate(sweeps):
        assert sweep[sweep.index("--datasets") + 1] == "OfficeHome" and "--single_test_envs" in sweep
        assert _sweep_hparams(sweep) == {"itl_loss": f"/o/meta{k}/loss.json"}
    reduced = build_commands(experiment, True, Placeholders("/d", "/o", "local"))
    assert all(r[r.index("--datasets") + 1] == "ColoredMNIST" for r in reduced[5::2])


def test_cli_show_of_a_staged_definition():
    result = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.paper_sweep", "show",
                             "table1_erm_losses", "--reduced", "--output_dir", "/o"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "stages, run in this order, each in <output_dir>/<stage>: meta_sce, losses, isce" in out
    assert "# stage isce (domainbed_sweep)" in out and "/o/meta_sce/loss.json" in out
    assert "stage meta_sce: meta-training: 1 job x 1.7 wall-minutes" in out
    assert "stage losses: ColoredMNIST: 12 jobs x 3.2 wall-minutes = 38.4 wall-minutes" in out
    assert "jobs: 16" in out and "per job (isce): as the losses stage" in out
    bad = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.paper_sweep", "show",
                          "table6_task_specific", "--command_launcher", "dummy"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "'dummy' is not one of local, submitit (runners meta_train, domainbed_sweep)" in bad.stderr


# --- runs (need DomainBed: every run imports it from the checkout) ----------------------------

def _stage_toml(name, runner, paper_args, reduced_args):
    """A [[stages]] entry of a definition file, with a placeholder cost."""
    cost = '[stages.{}.cost]\nunit = "wall-minutes"\nper_job = 1\nbasis = "b"\n'
    return (f'[[stages]]\nname = "{name}"\nrunner = "{runner}"\n[stages.paper.args]\n{paper_args}\n'
            + cost.format("paper") + f"[stages.reduced.args]\n{reduced_args}\n" + cost.format("reduced"))


HEADER = 'title = "tiny staged"\nreproduces = "nothing"\n'
META = 'outer_steps = 1\ninner_steps = 5\nper_domain_cap = 60\nno_progress = true\nresume = true\n'
SWEEP = 'datasets = ["Debug28"]\nalgorithms = ["ITL"]\n'


def _staged_toml(dataset):
    """Meta-train on `dataset`, then sweep Debug28 with the learned loss."""
    return HEADER + _stage_toml("meta", "meta_train", 'dataset = "synthetic"',
                                f'dataset = "{dataset}"\n{META}') \
        + _stage_toml("sweep", "domainbed_sweep", SWEEP,
                      SWEEP + 'n_hparams = 1\nn_trials = 1\nsingle_test_envs = true\nsteps = 1\n'
                      'hparams = { batch_size = 8, itl_loss = "{meta}/loss.json" }')


def _run_staged(root, tmp_path, dataset="synthetic"):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir(exist_ok=True)
    (sweeps / "staged.toml").write_text(_staged_toml(dataset))
    return subprocess.run(
        [sys.executable, "-m", "domainbed_itl.scripts.paper_sweep", "--sweeps_dir", str(sweeps), "run",
         "staged", "--reduced", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
         "--domainbed_root", str(root)], capture_output=True, text=True, timeout=600, env=domainbed_env(root))


@pytest.mark.slow
def test_a_staged_run_sweeps_with_the_loss_its_first_stage_learned(patched_domainbed, tmp_path):
    result = _run_staged(patched_domainbed, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    loss = tmp_path / "out" / "meta" / "loss.json"
    assert json.loads(loss.read_text())["family"] == "taylor"
    records = [json.loads(p.read_text().splitlines()[-1])
               for p in (tmp_path / "out" / "sweep").glob("*/results.jsonl")]
    assert len(records) == 3  # Debug28, one test environment at a time
    assert all(r["args"]["algorithm"] == "ITL" and r["hparams"]["itl_loss"] == str(loss) for r in records)
    assert "Total records: 3" in result.stdout  # collect_results of the sweep's folder
    # Running it again reuses the learned loss (resume at its last step) and launches nothing.
    before = loss.read_bytes()
    again = _run_staged(patched_domainbed, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert loss.read_bytes() == before
    assert len((tmp_path / "out" / "meta" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_staged_run_evaluates_the_loss_its_first_stage_learned(domainbed_root, tmp_path):
    # The evaluation, like meta-training, is one process: no patched checkout needed.
    evaluate = ('losses = ["CE", "learned={meta}/loss.json"]\ndataset = "synthetic"\nseeds = [0, 1]\n'
                'inner_steps = [5]\nhidden = "8"\nper_domain_cap = 60\n')
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "evaluated.toml").write_text(
        HEADER + _stage_toml("meta", "meta_train", 'dataset = "synthetic"', f'dataset = "synthetic"\n{META}')
        + _stage_toml("evaluate", "evaluate_loss", evaluate, evaluate))
    result = subprocess.run(
        [sys.executable, "-m", "domainbed_itl.scripts.paper_sweep", "--sweeps_dir", str(sweeps), "run",
         "evaluated", "--reduced", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
         "--domainbed_root", str(domainbed_root)],
        capture_output=True, text=True, timeout=600, env=domainbed_env(domainbed_root))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "evaluate" / "evaluation.json").read_text())
    assert str(tmp_path / "out" / "meta" / "loss.json") in json.dumps(report)
    assert "stage evaluate: loss evaluation: 1 job x 1 wall-minutes" in result.stdout


def test_a_failed_stage_stops_the_run(patched_domainbed, tmp_path):
    result = _run_staged(patched_domainbed, tmp_path, dataset="NoSuchData")
    assert result.returncode == 1 and "the command above failed" in result.stderr
    assert "NoSuchData" in result.stderr and not (tmp_path / "out" / "sweep").exists()


def test_dry_run_of_a_staged_definition_creates_nothing(tmp_path):
    code = paper_sweep.main(["run", "table6_task_specific", "--reduced", "--dry_run", "--data_dir",
                             str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert code == 0 and not (tmp_path / "out").exists()


# Two meta-trainings, the second starting from the first's loss.
CHAINED = HEADER + _stage_toml("first", "meta_train", 'dataset = "synthetic"',
                              f'dataset = "synthetic"\n{META}') \
    + _stage_toml("second", "meta_train", 'dataset = "synthetic"',
                  f'dataset = "synthetic"\n{META}init = "{{first}}/loss.json"')


def test_submitit_waits_for_a_stage_whose_output_a_later_stage_needs(domainbed_root, tmp_path, monkeypatch):
    from domainbed_itl.bridge import launchers

    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "chained.toml").write_text(CHAINED)
    argv = ["--sweeps_dir", str(sweeps), "run", "chained", "--reduced", "--data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--command_launcher", "submitit",
            "--domainbed_root", str(domainbed_root)]
    monkeypatch.setenv("DOMAINBED_SUBMITIT_CLUSTER", "local")
    monkeypatch.setenv("DOMAINBED_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    monkeypatch.setenv("DOMAINBED_SUBMITIT_GPUS", "0")
    monkeypatch.setenv("DOMAINBED_SUBMITIT_WAIT", "0")
    assert paper_sweep.main(argv) == 2 and not (tmp_path / "out").exists()
    monkeypatch.delenv("DOMAINBED_SUBMITIT_WAIT")
    seen = []
    real = launchers.make_submitit_launcher
    monkeypatch.setattr(launchers, "make_submitit_launcher",
                        lambda config: seen.append(config.wait) or real(config))
    assert paper_sweep.main(argv) == 0
    assert seen == [True, None]  # the first stage is waited for, the last left to the settings
    import torch

    first = json.loads((tmp_path / "out" / "first" / "loss.json").read_text())["parameters"]
    second = torch.load(tmp_path / "out" / "second" / "checkpoint.pt", weights_only=False)
    assert second["init_omega"] == pytest.approx(first)  # it started where the first ended


def test_the_runner_passes_resume_only_once_the_stage_folder_holds_a_checkpoint(tmp_path):
    run = ["python", "-m", "domainbed_itl.scripts.meta_train", "--resume", "--output_dir", str(tmp_path)]
    assert paper_sweep.resume_if_started(run) == [t for t in run if t != "--resume"]
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert paper_sweep.resume_if_started(run) == run
    sweep = ["python", "-m", "domainbed.scripts.sweep", "launch", "--output_dir", str(tmp_path / "x")]
    assert paper_sweep.resume_if_started(sweep) == sweep


def test_a_meta_stage_starts_without_resume_and_continues_with_it(domainbed_root, tmp_path):
    """`resume = true` in a definition: the first run starts the meta-training (a command refuses
    --resume where there is no run), the second continues it."""
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "one.toml").write_text(HEADER + _stage_toml("meta", "meta_train", 'dataset = "synthetic"',
                                                          f'dataset = "synthetic"\n{META}'))
    argv = [sys.executable, "-m", "domainbed_itl.scripts.paper_sweep", "--sweeps_dir", str(sweeps), "run",
            "one", "--reduced", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
            "--domainbed_root", str(domainbed_root)]
    runs = []
    for _ in range(2):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                                env=domainbed_env(domainbed_root))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs.append(next(line for line in result.stdout.splitlines() if line.startswith("$ ")))
    assert "--resume" not in runs[0] and "--resume" in runs[1]
    assert len((tmp_path / "out" / "meta" / "metrics.jsonl").read_text().splitlines()) == 1
