"""The paper's sweep definitions (sweeps/*.toml), their job counts and commands, and paper_sweep's CLI."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from domainbed_itl.datasets import DATASETS
from domainbed_itl.experiments.paper import (BUILD_TIME_FLAGS, DOMAINBED_SWEEP_FLAGS, EVALUATE_LOSS_FLAGS,
                                             META_TRAIN_FLAGS, ONE_JOB_RUNNERS,
                                             SINGLE_SOURCE_SWEEP_FLAGS, Placeholders,
                                             SweepDefinitionError, available, build_commands,
                                             count_jobs, count_stage_jobs, estimate_cost,
                                             load_experiment, parse_experiment, render_flags)
from domainbed_itl.scripts import paper_sweep

from conftest import domainbed_env

EXPERIMENTS = ["fig6_taylor_order", "table1_erm_losses", "table1_rsc_itl", "table2_multi_source",
               "table3_loss_zoo", "table4_single_source", "table5_meta_seeds", "table6_task_specific",
               "table8_fig3_meta_train"]
# Jobs at paper scale, by hand: datasets x algorithms x test-env settings x 20 hparams x 3 trials.
PAPER_JOBS = {
    "fig6_taylor_order": 4 + 1,                              # meta-train orders 2-5; evaluate
    "table1_erm_losses": 1 + 1 * 4 * 4 * 60 + 1 * 1 * 4 * 60,  # meta-train SCE; 4 losses; iSCE
    "table1_rsc_itl": 1 * 2 * 4 * 60,                        # PACS, single test envs
    "table2_multi_source": 6 * (6 + 4 * 10 + 21) * 60,       # 3 envs: 6 settings, 4: 10, 6: 21
    "table3_loss_zoo": 6 * 10 * 60,
    "table4_single_source": 4 * 5 * 4 * 60,                  # one job per source domain
    "table5_meta_seeds": 5 + 5 * 1 * 4 * 20 * 1,            # 5 meta-train seeds; OfficeHome, 1 trial
    "table6_task_specific": 1 + 1 * 3 * 60 + 1 * 3 * 60,     # meta-train; generic ITL; learned loss
    "table8_fig3_meta_train": 1,
}
REDUCED_JOBS = {"fig6_taylor_order": 4 + 1, "table1_erm_losses": 1 + 4 * 3 + 3,
                "table5_meta_seeds": 5 + 5 * 3, "table6_task_specific": 1 + 3 + 3}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.paper_sweep", *args],
                          capture_output=True, text=True, timeout=120)


def _minimal(**changes):
    data = {"title": "t", "reproduces": "r", "runner": "domainbed_sweep",
            "paper": {"args": {"datasets": ["PACS"], "algorithms": ["ERM"]},
                      "cost": {"unit": "GPU-hours", "per_job": 1.0, "basis": "b"}},
            "reduced": {"args": {"datasets": ["ColoredMNIST"], "algorithms": ["ERM", "ITL"],
                                 "n_hparams": 1, "n_trials": 1, "single_test_envs": True},
                        "cost": {"unit": "wall-minutes", "per_job": {"default": 2}, "basis": "b"}}}
    data.update(changes)
    return data


def test_every_paper_experiment_has_a_definition():
    assert available() == EXPERIMENTS
    for name in EXPERIMENTS:
        experiment = load_experiment(name)
        assert experiment.title and experiment.reproduces and experiment.notes.strip()
        for stage in experiment.stages:
            for reduced in (False, True):
                assert stage.variant(reduced).cost.basis


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_job_counts(name):
    assert sum(count_jobs(load_experiment(name), reduced=False).values()) == PAPER_JOBS[name]


@pytest.mark.parametrize("name", sorted(REDUCED_JOBS))
def test_reduced_job_counts_of_the_staged_definitions(name):
    assert sum(count_jobs(load_experiment(name), reduced=True).values()) == REDUCED_JOBS[name]


def test_reduced_variants_stay_on_mnist():
    for name in EXPERIMENTS:
        for stage in load_experiment(name).stages:
            args = stage.variant(reduced=True).args
            datasets = args.get("datasets", [args.get("dataset")])
            assert set(datasets) <= {"RotatedMNIST", "ColoredMNIST"}, name
            if "n_hparams" in args:
                assert args["n_hparams"] <= 2 and args.get("n_trials") == 1, name


def test_meta_training_stages_resume_so_that_a_rerun_reuses_the_loss():
    for name in EXPERIMENTS:
        experiment = load_experiment(name)
        for stage in experiment.stages:
            if stage.runner_name == "meta_train" and len(experiment.stages) > 1:
                assert all(stage.variant(r).args.get("resume") is True for r in (False, True)), name


def test_costs_are_jobs_times_cost_per_job():
    experiment = load_experiment("table2_multi_source")
    total, unit = estimate_cost(experiment, reduced=False)
    jobs = count_jobs(experiment, reduced=False)
    assert unit == "GPU-hours"
    assert total == pytest.approx(sum(n * experiment.variant(False).cost.of(d) for d, n in jobs.items()))
    assert jobs["DomainNet"] == 21 * 6 * 60 and jobs["ColoredMNIST"] == 6 * 6 * 60


def test_reduced_table2_commands():
    experiment = load_experiment("table2_multi_source")
    given = Placeholders("/data", "/out", "local")
    sweep, collect = build_commands(experiment, True, given)
    assert sweep == ["python", "-m", "domainbed.scripts.sweep", "launch",
                     "--datasets", "ColoredMNIST", "--algorithms", "ERM", "ITL",
                     "--n_hparams", "1", "--n_trials", "1", "--single_test_envs", "--steps", "101",
                     "--hparams", '{"batch_size": 32}', "--data_dir", "/data", "--output_dir", "/out",
                     "--command_launcher", "local", "--skip_confirmation"]
    assert collect == ["python", "-m", "domainbed.scripts.collect_results", "--input_dir", "/out"]


def test_meta_train_command_has_no_launcher_and_no_collection():
    experiment = load_experiment("table8_fig3_meta_train")
    (command,) = build_commands(experiment, False, Placeholders(domainbed_root="/db"))
    text = " ".join(command)
    assert "-m domainbed_itl.scripts.meta_train --preset paper --dataset RotatedMNIST" in text
    assert "--command_launcher" not in text
    assert text.endswith("--data_dir <data_dir> --output_dir <output_dir> --domainbed_root /db")


@pytest.mark.parametrize("reduced", [False, True])
def test_table8_definition_runs_the_paper_preset(reduced):
    from domainbed_itl.meta.config import preset_config
    from domainbed_itl.scripts.meta_train import build_parser

    (command,) = build_commands(load_experiment("table8_fig3_meta_train"), reduced, Placeholders())
    tokens = command[command.index("domainbed_itl.scripts.meta_train") + 1:]
    args = build_parser().parse_args(tokens)
    assert args.preset == "paper" and args.batched and args.resume
    config = preset_config(args.preset, {"outer_steps": args.outer_steps} if args.outer_steps else {})
    assert (config.neumann_form, config.aggregate_reduction, config.inner_steps) == (
        "algorithm2", "sum", 1000)
    assert config.outer_steps == (20 if reduced else 200)


def test_render_flags():
    assert render_flags({"a": [1, "x"], "b": True, "c": {"z": 1, "y": "s"}, "d": 0.5}) == [
        "--a", "1", "x", "--b", "--c", json.dumps({"y": "s", "z": 1}), "--d", "0.5"]


@pytest.mark.parametrize("changes, message", [
    ({"runner": "slurm_sweep"}, "runner 'slurm_sweep' is not one of"),
    ({"tables": 2}, "unknown key(s) tables"),
    ({"paper": {"args": {"datasets": ["PACS"], "algorithms": ["ERM"], "n_hparam": 5},
                "cost": {"unit": "h", "per_job": 1, "basis": "b"}}}, "unknown flag(s) n_hparam"),
    ({"paper": {"args": {"datasets": ["PACS"], "algorithms": ["ERM"], "output_dir": "/x"},
                "cost": {"unit": "h", "per_job": 1, "basis": "b"}}}, "output_dir must not be in"),
    ({"paper": {"args": {"datasets": [], "algorithms": ["ERM"]},
                "cost": {"unit": "h", "per_job": 1, "basis": "b"}}}, "datasets must be a non-empty list"),
    ({"paper": {"args": {"datasets": ["PACS"], "algorithms": ["ERM"], "n_trials": 0},
                "cost": {"unit": "h", "per_job": 1, "basis": "b"}}}, "n_trials must be an integer >= 1"),
    ({"paper": {"args": {"datasets": ["PACS"], "algorithms": ["ERM"]},
                "cost": {"unit": "h", "per_job": -1, "basis": "b"}}}, "per_job must be a number >= 0"),
    ({"paper": {"args": {"datasets": ["PACS"], "algorithms": ["ERM"]},
                "cost": {"unit": "h", "per_job": 1}}}, "missing key 'basis'"),
    ({"reduced": None}, "reduced must be a dict"),
])
def test_bad_definitions_are_refused_naming_the_problem(changes, message):
    data = _minimal(**changes)
    if data["reduced"] is None:
        data["reduced"] = 3
    with pytest.raises(SweepDefinitionError) as error:
        parse_experiment("x", data, Path("x.toml"))
    assert message in str(error.value) and "x.toml" in str(error.value)


def test_unknown_dataset_and_missing_cost_entry_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "domainbed", None)  # as if DomainBed were not installed
    bad = _minimal()
    bad["paper"]["args"]["datasets"] = ["Office31"]
    with pytest.raises(SweepDefinitionError, match="unknown dataset 'Office31'"):
        count_jobs(parse_experiment("x", bad), reduced=False)
    per_dataset = _minimal()
    per_dataset["paper"]["cost"]["per_job"] = {"VLCS": 1.0}
    with pytest.raises(SweepDefinitionError, match="no entry for 'PACS' and no 'default'"):
        estimate_cost(parse_experiment("x", per_dataset), reduced=False)


def test_cli_list_and_show():
    listed = _cli("list")
    assert listed.returncode == 0, listed.stderr
    assert all(name in listed.stdout for name in EXPERIMENTS)
    assert "24120" in listed.stdout and "GPU-hours" in listed.stdout
    shown = _cli("show", "table3_loss_zoo", "--reduced")
    assert shown.returncode == 0, shown.stderr
    assert "jobs: 18" in shown.stdout and "--command_launcher local" in shown.stdout
    assert "--data_dir <data_dir>" in shown.stdout and "wall-minutes" in shown.stdout
    paper = _cli("show", "table3_loss_zoo", "--data_dir", "/d")
    assert "jobs: 3600" in paper.stdout and "--command_launcher submitit" in paper.stdout
    assert "--data_dir /d" in paper.stdout and "estimated cost: 3600 GPU-hours" in paper.stdout


@pytest.mark.parametrize("args, message", [
    (["show", "table9"], "no sweep definition 'table9'"),
    (["show", "table2_multi_source", "--command_launcher", "slurm"],
     "--command_launcher 'slurm' is not one of local, dummy, multi_gpu, submitit"),
    (["show", "table8_fig3_meta_train", "--command_launcher", "multi_gpu"],
     "is not one of local, submitit"),
    (["--sweeps_dir", "/nonexistent", "list"], "/nonexistent does not exist"),
])
def test_cli_bad_input_exits_2_with_a_clear_message(args, message):
    result = _cli(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    if "table9" in args:
        assert "table2_multi_source" in result.stderr


def test_cli_invalid_toml_is_named(tmp_path):
    (tmp_path / "broken.toml").write_text("title = \n")
    result = _cli("--sweeps_dir", str(tmp_path), "show", "broken")
    assert result.returncode == 2 and "broken.toml is not valid TOML" in result.stderr


def test_run_dry_run_prints_and_creates_nothing(tmp_path):
    out = tmp_path / "out"
    result = _cli("run", "table2_multi_source", "--reduced", "--dry_run", "--data_dir", str(tmp_path),
                  "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert f"--output_dir {out}" in result.stdout and "jobs: 6" in result.stdout
    assert not out.exists()


def test_run_needs_data_dir_and_output_dir():
    result = _cli("run", "table2_multi_source")
    assert result.returncode == 2 and "--data_dir" in result.stderr


def test_run_refuses_an_unpatched_checkout(domainbed_root, tmp_path):
    from domainbed_itl.bridge.patching import status

    if {state.kind for state in status(domainbed_root)} == {"applied"}:
        pytest.skip("DOMAINBED_ROOT carries the patches already")
    code = paper_sweep.main(["run", "table2_multi_source", "--reduced", "--data_dir", str(tmp_path),
                             "--output_dir", str(tmp_path / "out"), "--domainbed_root",
                             str(domainbed_root)])
    assert code == 2 and not (tmp_path / "out").exists()


TINY = """
title = "tiny"
reproduces = "nothing"
runner = "domainbed_sweep"
[paper.args]
datasets = ["Debug28"]
algorithms = ["ERM", "ITL"]
[paper.cost]
unit = "GPU-hours"
per_job = 0.1
basis = "b"
[reduced.args]
datasets = ["Debug28"]
algorithms = ["ITL"]
n_hparams = 1
n_trials = 1
single_test_envs = true
steps = 3
[reduced.cost]
unit = "wall-minutes"
per_job = { Debug28 = 0.5 }
basis = "b"
"""


@pytest.mark.slow
def test_run_executes_the_sweep_and_the_collection(patched_domainbed, tmp_path):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "tiny.toml").write_text(TINY)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "domainbed_itl.scripts.paper_sweep", "--sweeps_dir", str(sweeps),
         "run", "tiny", "--reduced", "--data_dir", str(tmp_path), "--output_dir", str(out),
         "--command_launcher", "dummy", "--domainbed_root", str(patched_domainbed)],
        capture_output=True, text=True, timeout=300, env=domainbed_env(patched_domainbed))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "jobs: 3" in result.stdout and "1.5 wall-minutes" in result.stdout
    assert result.stdout.count("Dummy launcher: python -m domainbed.scripts.train") == 3
    assert "--algorithm ITL" in result.stdout and "Total records: 0" in result.stdout
    assert "plan: 3 jobs to launch (ITL on Debug28 x 3 steps)" in result.stdout
    assert "estimate: none with launcher dummy" in result.stdout or torch.cuda.is_available()
    assert (out / "results.txt").exists()
    first = result.stdout.split("\n$ ")[1].splitlines()[0]
    assert shlex.split(first)[1:4] == ["-m", "domainbed.scripts.sweep", "launch"]


def test_run_checks_the_losses_before_anything_starts(tmp_path):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "focal.toml").write_text(TINY.replace('algorithms = ["ITL"]', 'algorithms = ["ERM_Focal"]')
                                       .replace("steps = 3", "steps = 3\nhparams = { focal_gamma = -1.0 }"))
    out = tmp_path / "out"
    result = _cli("--sweeps_dir", str(sweeps), "run", "focal", "--reduced", "--data_dir", str(tmp_path),
                  "--output_dir", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {sweeps / 'focal.toml'}: --hparams: algorithm ERM_Focal: hparam focal_gamma=-1.0: "
        "expected a number >= 0 (the focusing parameter; 0 is cross-entropy) (dataset Debug28)"]
    assert result.stdout == "" and not out.exists()


@pytest.mark.slow
def test_run_names_the_failed_jobs_of_a_domainbed_sweep(patched_domainbed, tmp_path):
    """DomainBed's sweep exits 0 although its jobs failed (lr 1e30 turns ITL's loss to NaN, which
    stops them): paper_sweep names them, still collects, and exits 1."""
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "nan.toml").write_text(TINY.replace("steps = 3", 'steps = 5\nhparams = { batch_size = 8, '
                                                               'lr = 1e30 }'))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "domainbed_itl.scripts.paper_sweep", "--sweeps_dir", str(sweeps),
         "run", "nan", "--reduced", "--data_dir", str(tmp_path), "--output_dir", str(out),
         "--command_launcher", "local", "--domainbed_root", str(patched_domainbed)],
        capture_output=True, text=True, timeout=1800, env=domainbed_env(patched_domainbed))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    # The collection ran, over what the failed jobs wrote before their loss turned NaN.
    written = sum(len(f.read_text().splitlines()) for f in out.glob("*/results.jsonl"))
    assert f"Total records: {written}" in result.stdout
    lines = [line for line in result.stderr[result.stderr.index("error: 3 job folders"):].splitlines()
             if line.strip() and "nan jobs:" not in line]  # the progress bar's last state
    assert lines[0] == (f"error: 3 job folders in {out} have no `done` marker (DomainBed's `sweep "
                        "delete_incomplete` then `sweep launch` runs them again):")
    assert len(lines) == 4 and all("NonFiniteTrainingError: algorithm ITL: update" in line
                                   for line in lines[1:]), lines
    # Before the sweep: its plan, and the timing of its first job, which fails as the jobs do.
    assert "plan: 3 jobs to launch (ITL on Debug28 x 5 steps)" in result.stdout
    if not torch.cuda.is_available():
        assert "estimate: not available (NonFiniteTrainingError" in result.stdout
    assert "nan jobs:   0%" in result.stderr and "0/3" in result.stderr


def _long_options(parser):
    # Tests may read argparse's actions; the library keeps explicit lists instead.
    return {o[2:] for a in parser._actions for o in a.option_strings
            if o.startswith("--") and not o.startswith("--no-")} - {"help"}


@pytest.mark.parametrize("module, flags", [("single_source_sweep", SINGLE_SOURCE_SWEEP_FLAGS),
                                           ("meta_train", META_TRAIN_FLAGS)])
def test_runner_flag_lists_are_the_runners_flags(module, flags):
    import importlib

    parser = importlib.import_module(f"domainbed_itl.scripts.{module}").build_parser()
    assert flags == _long_options(parser) - BUILD_TIME_FLAGS


def test_evaluate_loss_flag_list_is_its_meta_protocols_flags():
    from domainbed_itl.scripts import evaluate_loss

    (subcommands,) = [a for a in evaluate_loss.build_parser()._actions if a.choices and "meta" in a.choices]
    assert EVALUATE_LOSS_FLAGS == _long_options(subcommands.choices["meta"]) - BUILD_TIME_FLAGS


def test_domainbed_sweep_flag_list_is_its_sweeps_flags(domainbed_root):
    import re

    text = (domainbed_root / "domainbed" / "scripts" / "sweep.py").read_text()
    flags = set(re.findall(r"""add_argument\(\s*['"]--(\w+)['"]""", text))
    assert DOMAINBED_SWEEP_FLAGS == flags - BUILD_TIME_FLAGS


def test_num_environments_match_domainbed(domainbed_root):
    from domainbed import datasets

    ours = {d: facts.environments for d, facts in DATASETS.items()}
    assert ours == {d: datasets.num_environments(d) for d in DATASETS}


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("reduced", [False, True])
def test_job_counts_match_domainbeds_make_args_list(domainbed_root, name, reduced):
    import domainbed_itl

    domainbed_itl.register()
    from domainbed import datasets
    from domainbed.lib import misc
    from domainbed.scripts.sweep import make_args_list

    experiment = load_experiment(name)
    total = 0
    for stage in experiment.stages:
        args = stage.variant(reduced).args
        if stage.runner_name in ONE_JOB_RUNNERS:
            assert count_stage_jobs(stage, reduced) == {None: 1}
            total += 1
            continue
        single_source = stage.runner_name == "single_source_sweep"
        args_list = make_args_list(
            n_trials=args.get("n_trials", 3), dataset_names=args["datasets"],
            algorithms=args["algorithms"], n_hparams_from=args.get("n_hparams_from", 0),
            n_hparams=args.get("n_hparams", 20), steps=args.get("steps"), data_dir="/d",
            task="domain_generalization", holdout_fraction=0.2,
            single_test_envs=single_source or args.get("single_test_envs", False),
            hparams=json.dumps(args["hparams"]) if "hparams" in args else None)
        if single_source:
            from domainbed_itl.single_source.planning import single_source_args

            args_list = [a for a, _ in single_source_args(args_list, datasets.num_environments,
                                                          misc.seed_hash, args.get("sources"))]
        assert sum(count_stage_jobs(stage, reduced).values()) == len(args_list), stage.name
        # The job the time estimate trains is the sweep's first (its seed aside).
        first, drop = paper_sweep.first_job(args, stage.runner_name, "/d"), ("seed", "hparams")
        assert ({k: v for k, v in first.items() if k not in drop}
                == {k: v for k, v in args_list[0].items() if k not in drop}), stage.name
        assert json.loads(first.get("hparams", "{}")) == json.loads(args_list[0].get("hparams") or "{}")
        total += len(args_list)
    assert sum(count_jobs(experiment, reduced).values()) == total


META = """
title = "tiny meta"
reproduces = "nothing"
runner = "meta_train"
[paper.args]
dataset = "synthetic"
outer_steps = 1
[paper.cost]
unit = "GPU-hours"
per_job = 1
basis = "b"
[reduced.args]
dataset = "synthetic"
outer_steps = 1
inner_steps = 5
no_progress = true
[reduced.cost]
unit = "wall-minutes"
per_job = 0.1
basis = "b"
"""


def test_run_meta_training_as_a_local_submitit_job(domainbed_root, tmp_path, monkeypatch):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "meta.toml").write_text(META)
    monkeypatch.setenv("DOMAINBED_SUBMITIT_CLUSTER", "local")
    monkeypatch.setenv("DOMAINBED_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    monkeypatch.setenv("DOMAINBED_SUBMITIT_GPUS", "0")
    out = tmp_path / "meta"
    code = paper_sweep.main(["--sweeps_dir", str(sweeps), "run", "meta", "--reduced", "--data_dir",
                             str(tmp_path), "--output_dir", str(out), "--command_launcher",
                             "submitit", "--domainbed_root", str(domainbed_root)])
    assert code == 0
    assert json.loads((out / "loss.json").read_text())["provenance"]["steps"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert list((tmp_path / "logs").glob("*_log.out")), "not run as a submitit job"


def test_run_meta_training_reports_a_failed_job(domainbed_root, tmp_path, monkeypatch, capsys):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "meta.toml").write_text(META.replace('dataset = "synthetic"\nouter_steps = 1\ninner',
                                                   'dataset = "NoSuchData"\nouter_steps = 1\ninner'))
    monkeypatch.setenv("DOMAINBED_SUBMITIT_CLUSTER", "local")
    monkeypatch.setenv("DOMAINBED_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    code = paper_sweep.main(["--sweeps_dir", str(sweeps), "run", "meta", "--reduced", "--data_dir",
                             str(tmp_path), "--output_dir", str(tmp_path / "meta"),
                             "--command_launcher", "submitit", "--domainbed_root", str(domainbed_root)])
    assert code == 1
    error = capsys.readouterr().err
    assert "1 of 1 submitit jobs failed" in error and "NoSuchData" in error
    monkeypatch.setenv("DOMAINBED_SUBMITIT_MEM_GB", "lots")
    code = paper_sweep.main(["--sweeps_dir", str(sweeps), "run", "meta", "--reduced", "--data_dir",
                             str(tmp_path), "--output_dir", str(tmp_path / "meta"),
                             "--command_launcher", "submitit", "--domainbed_root", str(domainbed_root)])
    assert code == 2
    assert "DOMAINBED_SUBMITIT_MEM_GB must be an integer >= 1, got 'lots'" in capsys.readouterr().err
