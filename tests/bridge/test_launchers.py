"""The submitit launcher: its settings, and real jobs through submitit's local executor."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from domainbed_itl.bridge.launchers import (LAUNCHERS, OUTPUT_LOG, CommandFailed, SubmititConfig,
                                            SubmititJobsFailed, default_folder, job_folder,
                                            launch_order,
                                            make_local_launcher,
                                            make_submitit_launcher, slot_gpus, submitit_launcher)
from domainbed_itl.files.running_jobs import RUNNING_MARKER, running

from conftest import domainbed_env

ALL_ENV = {
    "DOMAINBED_SUBMITIT_FOLDER": "/logs", "DOMAINBED_SUBMITIT_CLUSTER": "slurm",
    "DOMAINBED_SUBMITIT_PARTITION": "gpu", "DOMAINBED_SUBMITIT_GPUS": "2",
    "DOMAINBED_SUBMITIT_CPUS": "10", "DOMAINBED_SUBMITIT_MEM_GB": "64",
    "DOMAINBED_SUBMITIT_TIMEOUT_MIN": "90", "DOMAINBED_SUBMITIT_ARRAY_PARALLELISM": "16",
    "DOMAINBED_SUBMITIT_MAX_ARRAY_SIZE": "500", "DOMAINBED_SUBMITIT_WAIT": "true",
    "DOMAINBED_SUBMITIT_NAME": "itl", "DOMAINBED_SUBMITIT_EXTRA": '{"slurm_account": "dg"}',
}


def test_from_env_reads_every_variable():
    config = SubmititConfig.from_env(ALL_ENV)
    assert config == SubmititConfig(folder="/logs", cluster="slurm", partition="gpu", gpus_per_node=2,
                                    cpus_per_task=10, mem_gb=64, timeout_min=90,
                                    array_parallelism=16, max_array_size=500, wait=True, name="itl",
                                    extra={"slurm_account": "dg"})
    assert set(ALL_ENV) == set(SubmititConfig.ENV.values())


def test_from_env_defaults_and_empty_variables():
    assert SubmititConfig.from_env({}) == SubmititConfig()
    assert SubmititConfig.from_env({"DOMAINBED_SUBMITIT_PARTITION": ""}).partition is None


def test_executor_parameters_hold_the_slurm_settings():
    params = SubmititConfig.from_env(ALL_ENV).executor_parameters()
    assert params == {"name": "itl", "timeout_min": 90, "cpus_per_task": 10, "gpus_per_node": 2,
                      "mem_gb": 64, "slurm_array_parallelism": 16, "slurm_partition": "gpu",
                      "slurm_account": "dg"}


@pytest.mark.parametrize("var, raw, expected", [
    ("DOMAINBED_SUBMITIT_GPUS", "two", "must be an integer >= 0, got 'two'"),
    ("DOMAINBED_SUBMITIT_GPUS", "-1", "must be an integer >= 0, got '-1'"),
    ("DOMAINBED_SUBMITIT_CPUS", "0", "must be an integer >= 1, got '0'"),
    ("DOMAINBED_SUBMITIT_WAIT", "maybe", "must be 0, 1, true or false, got 'maybe'"),
    ("DOMAINBED_SUBMITIT_CLUSTER", "pbs", "must be slurm, local or debug, got 'pbs'"),
    ("DOMAINBED_SUBMITIT_EXTRA", "{account", "must be a JSON object"),
    ("DOMAINBED_SUBMITIT_EXTRA", "[1]", "must be a JSON object of submitit parameters, got '[1]'"),
])
def test_from_env_rejects_bad_values_naming_them(var, raw, expected):
    with pytest.raises(ValueError) as error:
        SubmititConfig.from_env({var: raw})
    assert str(error.value).startswith(f"{var} ") and expected in str(error.value)


@pytest.mark.parametrize("kwargs, expected", [
    ({"cluster": "pbs"}, "cluster must be slurm, local or debug, got 'pbs'"),
    ({"mem_gb": 0}, "mem_gb must be an integer >= 1, got 0"),
    ({"gpus_per_node": True}, "gpus_per_node must be an integer >= 0, got True"),
    ({"wait": "no"}, "wait must be True, False or None, got 'no'"),
    ({"extra": ["slurm_qos"]}, "extra must be a dict of submitit parameters"),
])
def test_config_rejects_bad_values_naming_them(kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        SubmititConfig(**kwargs)


def test_default_folder_is_beside_the_sweep_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    commands = [f"python -m domainbed.scripts.train --output_dir {sweep / h} --steps 3" for h in "ab"]
    assert default_folder(commands) == str(sweep / "submitit")
    assert default_folder(commands + ["python -c 'print(1)'"]) == "submitit_logs"
    apart = [f"x --output_dir {tmp_path / 'a' / 'j'}", f"x --output_dir {tmp_path / 'b' / 'j'}"]
    assert default_folder(apart) == "submitit_logs"


def test_slot_gpus_spread_local_jobs_over_the_gpus():
    assert [slot_gpus(s, 1, 4) for s in range(5)] == [(0,), (1,), (2,), (3,), (0,)]
    assert [slot_gpus(s, 2, 4) for s in range(3)] == [(0, 1), (2, 3), (0, 1)]
    assert slot_gpus(3, 1, 0) == () and slot_gpus(3, 0, 4) == ()


def test_command_failed_survives_pickling_and_names_the_signal():
    import pickle

    error = pickle.loads(pickle.dumps(CommandFailed("false", 2, ["oops"])))
    assert error.returncode == 2 and "exit status 2" in str(error) and "oops" in str(error)
    assert "killed by signal 9 (SIGKILL)" in str(CommandFailed("x", -9, []))


def test_registered_under_submitit():
    assert LAUNCHERS == {"submitit": submitit_launcher}


def _writer(path: Path, text: str, sleep: float = 0.0) -> str:
    code = (f"import time; t0 = time.time(); time.sleep({sleep}); "
            f"open({str(path)!r}, 'w').write({text!r} + ' %f %f' % (t0, time.time()))")
    return f"{sys.executable} -c \"{code}\""


def test_local_jobs_run_every_command_at_most_parallelism_at_once(tmp_path):
    outputs = [tmp_path / f"out{i}" for i in range(4)]
    config = SubmititConfig(folder=str(tmp_path / "logs"), cluster="local", array_parallelism=2,
                            timeout_min=5, gpus_per_node=0)
    make_submitit_launcher(config)([_writer(p, f"job{i}", sleep=1.0) for i, p in enumerate(outputs)])
    spans = []
    for i, path in enumerate(outputs):
        text, start, end = path.read_text().split()
        assert text == f"job{i}"
        spans.append((float(start), float(end)))
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most <= 2, f"more than 2 jobs ran at once: {spans}"
    assert list((tmp_path / "logs").glob("*_log.out")), "submitit wrote no job logs"


def test_failed_jobs_surface_with_command_status_stderr_and_logs(tmp_path):
    good = tmp_path / "good"
    failing = (f"{sys.executable} -c \"import sys; print('disk quota exceeded', file=sys.stderr); "
               f"sys.exit(3)\"")
    config = SubmititConfig(folder=str(tmp_path / "logs"), cluster="local", array_parallelism=2,
                            timeout_min=5, gpus_per_node=0)
    with pytest.raises(SubmititJobsFailed) as raised:
        make_submitit_launcher(config)([_writer(good, "ok"), failing])
    message = str(raised.value)
    assert message.startswith("1 of 2 submitit jobs failed:")
    assert failing in message and "exit status 3" in message and "disk quota exceeded" in message
    log = re.search(r"logs: (\S+_log\.err)", message).group(1)
    assert "disk quota exceeded" in Path(log).read_text()
    assert good.read_text().startswith("ok"), "the good job must still run"


def test_debug_cluster_runs_in_process(tmp_path):
    config = SubmititConfig(folder=str(tmp_path / "logs"), cluster="debug", gpus_per_node=0)
    make_submitit_launcher(config)([_writer(tmp_path / "a", "a"), _writer(tmp_path / "b", "b")])
    assert (tmp_path / "a").read_text().startswith("a") and (tmp_path / "b").read_text().startswith("b")
    with pytest.raises(SubmititJobsFailed, match="exit status 1"):
        make_submitit_launcher(config)(["exit 1"])


def test_no_wait_is_refused_for_local_jobs(tmp_path):
    config = SubmititConfig(folder=str(tmp_path / "logs"), cluster="local", wait=False)
    with pytest.raises(ValueError, match="needs the slurm cluster"):
        make_submitit_launcher(config)(["true"])
    assert not (tmp_path / "logs").exists()


def test_no_commands_submit_nothing(tmp_path, capsys):
    make_submitit_launcher(SubmititConfig(folder=str(tmp_path / "logs"), cluster="local"))([])
    assert "no commands" in capsys.readouterr().out and not (tmp_path / "logs").exists()


def test_domainbed_registry_knows_the_launcher(domainbed_root):
    import domainbed_itl
    from domainbed import command_launchers

    domainbed_itl.register()
    assert command_launchers.REGISTRY["submitit"] is submitit_launcher


@pytest.mark.slow
def test_domainbed_sweep_through_local_submitit_jobs(patched_domainbed, tmp_path):
    out = tmp_path / "sweep"
    env = {**domainbed_env(patched_domainbed), "DOMAINBED_SUBMITIT_CLUSTER": "local",
           "DOMAINBED_SUBMITIT_ARRAY_PARALLELISM": "3", "DOMAINBED_SUBMITIT_TIMEOUT_MIN": "10",
           "DOMAINBED_SUBMITIT_GPUS": "0"}
    env.pop("DOMAINBED_SUBMITIT_FOLDER", None)
    sweep = [sys.executable, "-m", "domainbed.scripts.sweep", "launch", "--datasets", "Debug28",
             "--algorithms", "ERM", "ITL", "--data_dir", str(tmp_path), "--output_dir", str(out),
             "--command_launcher", "submitit", "--n_hparams", "1", "--n_trials", "1",
             "--single_test_envs", "--steps", "3", "--hparams", '{"batch_size": 8}',
             "--skip_confirmation"]
    started = time.time()
    launched = subprocess.run(sweep, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "local executor" in launched.stdout and "all 6 jobs succeeded" in launched.stdout

    jobs = [p for p in out.iterdir() if p.is_dir() and p.name != "submitit"]
    assert len(jobs) == 6 and all((p / "done").exists() for p in jobs)
    logs = list((out / "submitit").glob("*_log.out"))
    assert len(logs) == 6 and all(log.stat().st_mtime >= started - 1 for log in logs)

    collected = subprocess.run([sys.executable, "-m", "domainbed.scripts.collect_results",
                                "--input_dir", str(out)], env=env, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert re.search(r"^ITL\s+\d", collected.stdout, flags=re.M), collected.stdout
    assert re.search(r"^ERM\s+\d", collected.stdout, flags=re.M), collected.stdout

    relaunch = subprocess.run(sweep, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "6 done" in relaunch.stdout and "no commands to launch" in relaunch.stdout


@pytest.mark.slow
def test_domainbed_sweep_reports_a_failing_train_job(patched_domainbed, tmp_path):
    out = tmp_path / "sweep"
    env = {**domainbed_env(patched_domainbed), "DOMAINBED_SUBMITIT_CLUSTER": "local",
           "DOMAINBED_SUBMITIT_TIMEOUT_MIN": "10", "DOMAINBED_SUBMITIT_GPUS": "0"}
    launched = subprocess.run(
        [sys.executable, "-m", "domainbed.scripts.sweep", "launch", "--datasets", "Debug28",
         "--algorithms", "ITL", "--data_dir", str(tmp_path), "--output_dir", str(out),
         "--command_launcher", "submitit", "--n_hparams", "1", "--n_trials", "1",
         "--single_test_envs", "--steps", "3",
         "--hparams", '{"batch_size": 8, "itl_loss": "no_such_loss.json"}', "--skip_confirmation"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert launched.returncode != 0
    assert "3 of 3 submitit jobs failed" in launched.stderr
    assert "no_such_loss.json" in launched.stderr and "exit status 1" in launched.stderr
    assert not any((p / "done").exists() for p in out.iterdir() if p.is_dir())


def test_local_slots_get_their_own_gpus(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    outputs = [tmp_path / f"gpu{i}" for i in range(2)]
    commands = [f"{sys.executable} -c \"import os, time; time.sleep(1); open({str(p)!r}, 'w')"
                f".write(os.environ['CUDA_VISIBLE_DEVICES'])\"" for p in outputs]
    config = SubmititConfig(folder=str(tmp_path / "logs"), cluster="local", array_parallelism=2,
                            timeout_min=5, gpus_per_node=1)
    make_submitit_launcher(config)(commands)
    assert sorted(p.read_text() for p in outputs) == ["0", "1"]


class _FakeJob:
    def __init__(self, job_id, error=None):
        self.job_id, self._error = job_id, error
        self.paths = SimpleNamespace(stderr=f"/logs/{job_id}_0_log.err", stdout=f"/logs/{job_id}_0_log.out")

    def exception(self):
        return self._error


class _FakeSlurmExecutor:
    """Stands in for submitit's AutoExecutor on a Slurm cluster (there is none here)."""

    arrays, parameters, failing = [], {}, set()

    def __init__(self, folder, cluster=None):
        self.cluster = cluster

    @staticmethod
    def which():
        return "slurm"

    def update_parameters(self, **params):
        type(self).parameters = params

    def map_array(self, fn, commands):
        array = len(self.arrays)
        self.arrays.append(list(commands))
        return [_FakeJob(f"{1000 + array}_{i}", RuntimeError(f"{CommandFailed.MARKER}: exit status 9")
                         if c in self.failing else None) for i, c in enumerate(commands)]


@pytest.fixture
def fake_slurm(monkeypatch):
    import submitit

    _FakeSlurmExecutor.arrays, _FakeSlurmExecutor.parameters = [], {}
    _FakeSlurmExecutor.failing = set()
    monkeypatch.setattr(submitit, "AutoExecutor", _FakeSlurmExecutor)
    return _FakeSlurmExecutor


def test_slurm_commands_go_out_in_arrays_of_at_most_max_array_size(fake_slurm, capsys):
    commands = [f"echo {i}" for i in range(2500)]
    config = SubmititConfig(folder="/logs", partition="gpu", max_array_size=1000, array_parallelism=8)
    make_submitit_launcher(config)(commands)
    assert [len(a) for a in fake_slurm.arrays] == [1000, 1000, 500]
    assert sum(fake_slurm.arrays, []) == commands
    assert fake_slurm.parameters["slurm_partition"] == "gpu"
    assert fake_slurm.parameters["slurm_array_parallelism"] == 8
    assert "2500 jobs queued" in capsys.readouterr().out


def test_slurm_wait_reports_failures(fake_slurm):
    fake_slurm.failing = {"echo 1"}
    config = SubmititConfig(folder="/logs", wait=True)
    with pytest.raises(SubmititJobsFailed, match=r"1 of 3 submitit jobs failed:\n\[job 1000_1\] echo 1"):
        make_submitit_launcher(config)(["echo 0", "echo 1", "echo 2"])


# ------------------------------------------------------------------ the stoppable local launcher

def _job_command(folder, code):
    """A shell command running python `code` that reads as a DomainBed train command of job
    `folder` (its module name as an argument, its --output_dir)."""
    return (f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} domainbed.scripts.train "
            f"--output_dir {shlex.quote(str(folder))}")


def test_only_domainbed_train_commands_have_job_folders(tmp_path):
    assert job_folder(f"python -m domainbed.scripts.train --output_dir {tmp_path}") == tmp_path
    assert job_folder(f"python -m domainbed.scripts.train --output_dir {tmp_path / 'absent'}") is None
    assert job_folder(f"python -m domainbed_itl.scripts.meta_train --output_dir {tmp_path}") is None


def _ended(pid):
    """Whether process `pid` has ended (gone, or a zombie its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def test_local_jobs_write_to_their_folder_and_leave_no_running_marker(tmp_path, capfd):
    folders = [tmp_path / f"{i:032x}" for i in range(2)]
    for folder in folders:
        folder.mkdir()
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit({})"
    make_local_launcher()([_job_command(folders[0], code.format(0)),
                           _job_command(folders[1], code.format(3))])  # a failure stops nothing
    for folder in folders:
        assert (folder / OUTPUT_LOG).read_text().split() == ["to", "stdout", "to", "stderr"]
        assert not (folder / RUNNING_MARKER).exists()
    assert "to stdout" not in capfd.readouterr().out
    make_local_launcher(verbose=True)([_job_command(folders[0], code.format(0))])
    assert "to stdout" in capfd.readouterr().out


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_local_launcher_stops_its_job_and_the_jobs_children(tmp_path, how):
    """SIGINT to the launcher's whole process group (Ctrl-C on a terminal), or SIGTERM to the
    launcher alone (a scheduler's `kill`): the job, in a group of its own, gets neither (so no
    traceback of its own); the launcher stops its group, the job's own child included, removes
    the running marker and goes on with the interruption (SIGTERM: it then ends by it)."""
    folder, pid_file = tmp_path / ("a" * 32), tmp_path / "grandchild.pid"
    folder.mkdir()
    job = (f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); "
           f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    driver = ("import sys; from domainbed_itl.bridge.launchers import make_local_launcher; "
              "make_local_launcher(stop_timeout_s=5)([sys.argv[1]])")
    launcher = subprocess.Popen([sys.executable, "-c", driver, _job_command(folder, job)],
                                start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.1)
    assert running(folder)  # its marker names a live process running this folder's job
    grandchild = int(pid_file.read_text())
    if how == "ctrl-c":
        os.killpg(launcher.pid, signal.SIGINT)
    else:
        launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=60)
    if how == "ctrl-c":
        assert "KeyboardInterrupt" in stderr  # the launcher's own interruption goes on
    else:
        assert launcher.returncode == -signal.SIGTERM, stderr
    assert not (folder / RUNNING_MARKER).exists() and running(folder) is None
    deadline = time.monotonic() + 30
    while not _ended(grandchild):
        assert time.monotonic() < deadline, f"the job's child {grandchild} still runs"
        time.sleep(0.05)
    assert "Traceback" not in (folder / OUTPUT_LOG).read_text()


def test_launch_order_is_the_order_domainbeds_job_launch_runs(domainbed_root, tmp_path):
    """The estimate times the jobs that run first: `launch_order` predicts DomainBed's shuffle."""
    import numpy as np
    from domainbed.scripts import sweep

    jobs = [sweep.Job({"dataset": "Debug28", "algorithm": "ERM", "test_envs": [i % 3], "seed": i},
                      str(tmp_path)) for i in range(8)]
    np.random.seed(1)
    predicted = launch_order(jobs)
    launched = []
    sweep.Job.launch(jobs, launched.extend)
    assert launched == [job.command_str for job in predicted]
    assert launched != [job.command_str for job in jobs]  # it did shuffle them
