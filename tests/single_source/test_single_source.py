"""The single-source launcher (single_source_sweep): bad input and loss checks named before
anything runs, DomainBed's sweep flags and submitit settings; with DomainBed (DOMAINBED_ROOT),
real sweeps end to end: Debug28 and RotatedMNIST, relaunch, failed jobs, a second launcher, and
an interrupted sweep."""

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

import pytest

from conftest import collect_single_source, domainbed_env, no_domainbed_env, processes_naming
from domainbed_itl.bridge.domainbed_env import with_pythonpath
from domainbed_itl.single_source import planning
from domainbed_itl.files import sweepfolder as run_folders
from domainbed_itl.files.running_jobs import RUNNING_MARKER, mark_running
from domainbed_itl.scripts import single_source_sweep as sweep




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
     "an existing file; expected a preset loss (ITL, learned-RotatedMNIST, stationary-RotatedMNIST, "
     "composite-RotatedMNIST) or the path of a loss file"),
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
        capture_output=True, text=True, timeout=300, env=no_domainbed_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: --hparams: algorithm ITL: hparam itl_loss='typo.json' is neither a preset loss nor "
        "an existing file; expected a preset loss (ITL, learned-RotatedMNIST, stationary-RotatedMNIST, "
        "composite-RotatedMNIST) or the path of a loss file"]
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
         str(root)], capture_output=True, text=True, timeout=timeout, env=env or no_domainbed_env())
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
    result = collect_single_source("--input_dir", str(out), "--domainbed_root", str(root),
                                   env=no_domainbed_env())
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
    report = collect_single_source("--input_dir", str(out), "--domainbed_root", str(patched_domainbed),
                      env=no_domainbed_env()).stdout
    targets = "/".join(f"{100 * rec[f'env{t}_in_acc']:.1f}" for t in range(1, 6))
    assert re.search(rf"^ERM\s+{re.escape(targets)} \d+\.\d \+/- 0\.0\s+X \[0/1 trials\]", report,
                     flags=re.M), report
    assert "0 -> 15/30/45/60/75" in report
    for source in range(1, 6):  # the protocol needs every source: the others are named as missing
        assert f"RotatedMNIST/ERM source {source} trial 0 hparams_seed 0: no job folder" in report



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
                              start_new_session=True, env=no_domainbed_env(), text=True,
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
    assert processes_naming(started) == [] and not (started / RUNNING_MARKER).exists()
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
