"""The one command from a fresh machine to an ERM vs ITL sweep, driven against git repositories
made in the test (never the network) and against an existing checkout.

Without DomainBed (CI) the DomainBed stand-in is cloned, patched and verified (`--setup_only`);
with DOMAINBED_ROOT a clone of it runs DomainBed's real sweep and collect_results.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DOMAINBED_ROOT, MNIST10K, STANDIN, domainbed_env, processes_naming

from domainbed_itl.bridge.patching import UPSTREAM_COMMIT
from domainbed_itl.files.sweepfolder import remove_never_started, unfinished_jobs
from domainbed_itl.bridge.domainbed_data import MNIST_FILES
from domainbed_itl.scripts.quickstart import build_parser, mnist_problem

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
DEBUG = ["--datasets", "Debug28", "--hparams", '{"batch_size": 8}', "--steps", "3"]


def _quickstart(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.quickstart", *args],
                          capture_output=True, text=True, timeout=timeout)


def _repository(origin: Path, dest: Path) -> str:
    """A git repository at `dest` holding a copy of `origin`; its commit."""
    shutil.copytree(origin, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "upstream"]):
        subprocess.run([*GIT, *args], cwd=dest, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_clones_patches_and_verifies_a_repository(tmp_path):
    commit = _repository(STANDIN, tmp_path / "upstream")
    workdir = tmp_path / "work"
    flags = ["--workdir", str(workdir), "--domainbed_url", str(tmp_path / "upstream"),
             "--domainbed_commit", commit, "--datasets", "Debug28", "--setup_only"]
    first = _quickstart(*flags)
    assert first.returncode == 0, first.stderr
    clone = workdir / "DomainBed"
    assert f"cloning {tmp_path / 'upstream'} at {commit}" in first.stdout
    assert "verified by importing DomainBed" in first.stdout
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True)
    assert head.stdout.strip() == commit
    assert "domainbed_itl" in (clone / "domainbed" / "algorithms.py").read_text()
    assert "domainbed.scripts.sweep launch --datasets Debug28 --algorithms ERM ITL" in first.stdout

    second = _quickstart(*flags)
    assert second.returncode == 0 and f"reusing {clone} (at commit {commit})" in second.stdout
    assert "patches: already applied" in second.stdout


@pytest.mark.parametrize("url, commit, message", [
    ("{tmp}/no_such_repository", None, "git clone of DomainBed"),
    ("{tmp}/upstream", "0123456789abcdef0123456789abcdef01234567", "git checkout of DomainBed 0123456789"),
])
def test_a_failed_clone_leaves_nothing_behind(tmp_path, url, commit, message):
    head = _repository(STANDIN, tmp_path / "upstream")
    workdir = tmp_path / "work"
    result = _quickstart("--workdir", str(workdir), "--domainbed_url", url.format(tmp=tmp_path),
                         "--domainbed_commit", commit or head, "--setup_only")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "--domainbed_root path/to/DomainBed" in result.stderr and "--domainbed_url" in result.stderr
    assert not workdir.exists()  # a refused quickstart leaves no empty work folder


def test_an_existing_checkout_the_hooks_cannot_fit_is_refused(tmp_path):
    checkout = tmp_path / "DomainBed"
    shutil.copytree(STANDIN, checkout)
    launchers = checkout / "domainbed" / "command_launchers.py"
    launchers.write_text(launchers.read_text().replace("REGISTRY", "LAUNCHERS"))
    result = _quickstart("--workdir", str(tmp_path / "work"), "--domainbed_root", str(checkout),
                         "--setup_only")
    assert result.returncode == 2 and "does not define REGISTRY" in result.stderr
    assert "domainbed_itl" not in (checkout / "domainbed" / "algorithms.py").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DomainBed"]  # no work folder


def test_a_refused_quickstart_makes_no_work_folder_nor_its_parents(tmp_path):
    (tmp_path / "not_domainbed").mkdir()
    workdir = tmp_path / "a" / "b" / "work"
    for flags, message in ((["--domainbed_root", str(tmp_path / "not_domainbed")],
                            "is not a DomainBed checkout"),
                           (["--hparams", "{bad"], "--hparams"),
                           (["--test_envs", "-2"], "--test_envs must be environment indices"),
                           (["--data_dir", str(tmp_path / "d" / "data"), "--domainbed_root",
                             str(tmp_path / "nowhere")], "is not a DomainBed checkout")):
        result = _quickstart("--workdir", str(workdir), *flags)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr  # one line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["not_domainbed"], flags


def test_dry_run_and_bad_input(tmp_path):
    result = _quickstart("--workdir", str(tmp_path / "work"), "--dry_run")
    assert result.returncode == 0 and not (tmp_path / "work").exists()
    assert f"at {UPSTREAM_COMMIT}" in result.stdout
    assert ("domainbed.scripts.sweep launch --datasets RotatedMNIST --algorithms ERM ITL --data_dir "
            f"{tmp_path / 'work' / 'data'}") in result.stdout
    assert "--n_hparams 1 --n_trials 1 --single_test_envs --steps 1000" in result.stdout
    assert "only its jobs" not in result.stdout
    some = _quickstart("--workdir", str(tmp_path / "work"), "--dry_run", "--test_envs", "0", "5")
    assert some.returncode == 0 and "(only its jobs with test env 0, 5)" in some.stdout
    for flags, message in ((["--steps", "0"], "--steps must be at least 1, got 0"),
                           (["--hparams", "[8]"], "--hparams must be a JSON object"),
                           (["--test_envs", "0", "-1"], "--test_envs must be environment indices "
                                                        "(0, 1, ...), got 0 -1")):
        bad = _quickstart("--workdir", str(tmp_path / "work"), *flags)
        assert bad.returncode == 2 and message in bad.stderr
    assert not (tmp_path / "work").exists()


def test_help_shows_every_default():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "(default" in action.help, action.option_strings
    text = parser.format_help()
    for default in ("(default: 1000)", "(default: local)", "(default: ERM ITL)", "(default: b93c22a)",
                    "(default: https://github.com/facebookresearch/DomainBed)"):
        assert default in " ".join(text.split()), default


def test_missing_mnist_names_the_files_and_the_folder(tmp_path):
    problem = mnist_problem(tmp_path, download=False)
    assert f"Put these four files into {tmp_path.resolve() / 'MNIST' / 'raw'}/" in problem
    assert all(name in problem for name in MNIST_FILES)
    if (MNIST10K / "MNIST" / "raw").is_dir():
        assert mnist_problem(MNIST10K, download=False) is None


def test_only_the_empty_folders_of_jobs_never_started_are_removed(tmp_path):
    started, never, logs = tmp_path / ("a" * 32), tmp_path / ("b" * 32), tmp_path / "submitit"
    for folder in (started, never, logs):
        folder.mkdir()
    (started / "out.txt").write_text("step 0\n")
    assert remove_never_started(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([started.name, logs.name])
    assert remove_never_started(tmp_path / "absent") == 0


def test_unfinished_jobs_are_named_with_their_last_error(tmp_path):
    done, failed, silent = (tmp_path / h for h in ("a" * 32, "b" * 32, "c" * 32))
    for folder in (done, failed, silent, tmp_path / "submitit"):
        folder.mkdir()
    (done / "done").write_text("")
    (failed / "err.txt").write_text("Traceback ...\nLossFileError: 'typo.json' is neither a preset\n")
    assert unfinished_jobs(tmp_path) == [f"{failed}: LossFileError: 'typo.json' is neither a preset",
                                         f"{silent}: no err.txt"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A local git repository of DomainBed at the pinned commit when DOMAINBED_ROOT's history has
    it (a bare clone), else a fresh repository of a copy; with the commit to check out."""
    if DOMAINBED_ROOT is None:
        pytest.skip("needs a DomainBed checkout: set DOMAINBED_ROOT")
    tmp = tmp_path_factory.mktemp("upstream")
    pinned = subprocess.run(["git", "-C", str(DOMAINBED_ROOT), "cat-file", "-e",
                             f"{UPSTREAM_COMMIT}^{{commit}}"], capture_output=True)
    if pinned.returncode == 0:
        subprocess.run(["git", "clone", "--quiet", "--bare", str(DOMAINBED_ROOT), str(tmp / "DomainBed.git")],
                       check=True, capture_output=True)
        return tmp / "DomainBed.git", UPSTREAM_COMMIT
    return tmp / "DomainBed", _repository(DOMAINBED_ROOT, tmp / "DomainBed")


@pytest.mark.slow
def test_the_sweep_runs_and_prints_collect_results(upstream, tmp_path):
    url, commit = upstream
    workdir = tmp_path / "work"
    result = _quickstart("--workdir", str(workdir), "--domainbed_url", str(url), "--domainbed_commit",
                         commit, "--data_dir", str(tmp_path / "data"), *DEBUG)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = [p for p in (workdir / "sweep").iterdir() if p.is_dir()]
    assert len(jobs) == 6 and all((p / "done").exists() for p in jobs)  # 2 algorithms x 3 test envs
    assert "plan: 6 jobs to launch (ERM ITL on Debug28 x 3 steps" in result.stdout
    if not torch.cuda.is_available():
        assert "estimate (no GPU; timed here on the first job" in result.stdout
        assert "To shrink the sweep: --steps, --test_envs" in result.stdout
    assert "quickstart jobs: 100%" in result.stderr and "6/6" in result.stderr
    assert "This DataLoader will create" not in result.stdout + result.stderr
    table = result.stdout.split("domainbed.scripts.collect_results")[-1]
    for algorithm in ("ERM", "ITL"):
        assert any(line.startswith(f"{algorithm} ") and "X" not in line for line in table.splitlines())
    records = [json.loads(line) for p in jobs for line in (p / "results.jsonl").read_text().splitlines()]
    assert {r["args"]["algorithm"] for r in records} == {"ERM", "ITL"}

    # Again, on the clone as an existing checkout: nothing is rerun, the table is printed again.
    again = _quickstart("--workdir", str(workdir), "--domainbed_root", str(workdir / "DomainBed"),
                        "--data_dir", str(tmp_path / "data"), *DEBUG)
    assert again.returncode == 0 and "About to launch 0 jobs." in again.stdout
    assert again.stdout.split("domainbed.scripts.collect_results")[-1] == table

    # As after an interrupted run: a job whose folder DomainBed made but never started runs now.
    shutil.rmtree(jobs[0])
    jobs[0].mkdir()
    resumed = _quickstart("--workdir", str(workdir), "--domainbed_root", str(workdir / "DomainBed"),
                          "--data_dir", str(tmp_path / "data"), *DEBUG)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "1 job(s) of an earlier run never started" in resumed.stdout
    assert "About to launch 1 jobs." in resumed.stdout and (jobs[0] / "done").exists()


@pytest.mark.slow
def test_some_test_envs_and_failed_jobs_with_a_command_that_clears_them(upstream, tmp_path):
    """--test_envs runs those jobs only; jobs that fail (lr 1e30 turns ITL's loss to NaN) are named
    with DomainBed's delete_incomplete, which runs without a prompt; --no_progress prints no bar."""
    url, commit = upstream
    clone = _quickstart("--workdir", str(tmp_path / "first"), "--domainbed_url", str(url),
                        "--domainbed_commit", commit, "--datasets", "Debug28", "--setup_only")
    assert clone.returncode == 0, clone.stderr
    root = tmp_path / "first" / "DomainBed"
    workdir = tmp_path / "work"
    result = _quickstart("--workdir", str(workdir), "--domainbed_root", str(root), "--data_dir",
                         str(tmp_path / "data"), "--datasets", "Debug28", "--algorithms", "ITL",
                         "--test_envs", "0", "2", "--steps", "5", "--no_progress",
                         "--hparams", '{"batch_size": 8, "lr": 1e30}')
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "plan: 2 jobs to launch" in result.stdout and "estimate" not in result.stdout
    assert "quickstart jobs" not in result.stderr
    jobs = [p for p in (workdir / "sweep").iterdir() if p.is_dir()]
    envs = sorted(json.loads((p / "results.jsonl").read_text().splitlines()[0])["args"]["test_envs"]
                  for p in jobs)
    assert envs == [[0], [2]] and not any((p / "done").exists() for p in jobs)
    lines = result.stderr.splitlines()
    command = lines[lines.index("Fix the cause, clear them with") + 1].strip()
    assert command.startswith(f"PYTHONPATH={root} ") and command.endswith("--skip_confirmation")
    assert " delete_incomplete " in command
    env_assignment, *tokens = shlex.split(command)
    cleared = subprocess.run(tokens, env=domainbed_env(root), capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=300)
    assert cleared.returncode == 0 and "Deleted 2 jobs!" in cleared.stdout, cleared.stderr
    assert not any(p.exists() for p in jobs)


def _table(stdout):
    """The collect_results tables printed after the quickstart's collect command."""
    return stdout.split("(its finished jobs only)")[-1].split("\ndone: ")[0]


def _accuracies(sweep):
    """Every job's records: its folder's name (the hash of its arguments), step and accuracies
    (times, and the output folder in its arguments, differ between runs)."""
    return sorted(json.dumps({"job": p.name, **{k: v for k, v in json.loads(line).items()
                                                if k.endswith("_acc") or k == "step"}}, sort_keys=True)
                  for p in sweep.iterdir() if (p / "results.jsonl").exists()
                  for line in (p / "results.jsonl").read_text().splitlines())



@pytest.mark.slow
def test_an_interrupted_quickstart_resumes_in_one_command_to_the_uninterrupted_table(upstream, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) in the middle of a job:
    the job is stopped with no traceback of its own; the same command then says which job did
    not finish, relaunches it without a prompt, and prints the table of an uninterrupted run."""
    url, commit = upstream
    clone = _quickstart("--workdir", str(tmp_path / "first"), "--domainbed_url", str(url),
                        "--domainbed_commit", commit, "--datasets", "Debug28", "--setup_only")
    assert clone.returncode == 0, clone.stderr
    root = tmp_path / "first" / "DomainBed"

    def command(workdir):
        return [sys.executable, "-m", "domainbed_itl.scripts.quickstart", "--workdir", str(workdir),
                "--domainbed_root", str(root), "--data_dir", str(tmp_path / "data"),
                "--datasets", "Debug28", "--hparams", '{"batch_size": 8}', "--test_envs", "0",
                "--steps", "300", "--no_progress"]

    reference = subprocess.run(command(tmp_path / "reference"), capture_output=True, text=True,
                               timeout=900, stdin=subprocess.DEVNULL)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    sweep = tmp_path / "work" / "sweep"
    first = subprocess.Popen(command(tmp_path / "work"), start_new_session=True, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline, started = time.monotonic() + 600, None
    while started is None:  # a job that logged its first checkpoint and has not finished
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        started = next((p for p in sweep.glob("*/results.jsonl")
                        if p.stat().st_size and not (p.parent / "done").exists()), None)
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, out[-3000:] + err[-3000:]
    assert "interrupted: the running job was stopped; run the same command again" in err
    assert "Traceback" not in out + err
    job = started.parent
    assert not (job / "done").exists() and processes_naming(job) == []
    assert not (job / "running.pid").exists()

    again = subprocess.run(command(tmp_path / "work"), capture_output=True, text=True, timeout=900,
                           stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "job(s) of an earlier run did not finish (interrupted or failed); their folders are " \
           "removed and they run again:" in again.stdout
    assert str(job) in again.stdout and (job / "done").exists()
    assert _table(again.stdout) == _table(reference.stdout)
    assert _accuracies(sweep) == _accuracies(tmp_path / "reference" / "sweep")
