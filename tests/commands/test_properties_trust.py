"""The trust boundaries (docs/files.md): results files that mix runs, losses that cannot be
minimised, a full disk and a read-only folder, SIGTERM, hostile pickles outside run folders,
broken family plugins, and a loss whose gradient is a broadcast tensor."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property_harness import (COMMANDS, FIXTURE, INNER, META, SOME, call, check_boundary,
                              hostile_bytes, run_checked, sandbox)

from domainbed_itl.files import atomic
from domainbed_itl.files.runfolder import load_checkpoint, read_metrics
from domainbed_itl.files.sweepfolder import load_runs, mixed_runs
from domainbed_itl.meta.runner import META_RUN
from domainbed_itl.scripts import evaluate_loss, meta_train, significance


MIXES = {"seed": lambda r: {**r, "args": {**r["args"], "seed": r["args"].get("seed", 0) + 1}},
         "hparams": lambda r: {**r, "hparams": {**r["hparams"], "lr": 0.5}},
         "steps": lambda r: {**r, "args": {**r["args"], "steps": r["args"].get("steps", 0) + 7}},
         "restart": lambda r: r}


@SOME
@given(mix=st.sampled_from(sorted(MIXES)), count=st.integers(1, 3), data=st.data())
def test_a_results_file_that_mixes_runs_is_set_aside_naming_it(mix, count, data):
    """Records of a second run appended to a job's results.jsonl (another seed, hparams, step
    count, or the same run started again) never count as the job's: every reader sets the
    job aside, naming the file; the other jobs are read as before."""
    with sandbox() as root:
        sweep = root / "sweep"
        shutil.copytree(FIXTURE, sweep)
        jobs = sorted(p for p in sweep.iterdir() if (p / "results.jsonl").exists())
        job = data.draw(st.sampled_from(jobs))
        results = job / "results.jsonl"
        lines = results.read_text().splitlines()
        appended = [json.dumps(MIXES[mix](json.loads(line))) for line in lines[:count]]
        results.write_text("\n".join(lines + appended) + "\n")
        runs_read = {run.folder: run for run in load_runs(sweep)}
        assert runs_read[job.name].records == [] and str(results) in runs_read[job.name].error
        assert all(run.records for name, run in runs_read.items() if name != job.name)
        code, err = call(significance.main, ["--single_source_dir", sweep, "--output_dir",
                                             root / "sig"])
        check_boundary(code, err)


def test_one_run_of_a_results_file_is_read_whole():
    runs_read = load_runs(FIXTURE)
    assert runs_read and all(run.error is None and run.records for run in runs_read)
    assert mixed_runs(runs_read[0].records) is None


@SOME
@given(dataset=st.sampled_from(["synthetic", "planted"]),
       parameters=st.sampled_from([[0.0] * 12, [math.inf] + [0.0] * 11]))
def test_a_loss_check_holds_for_every_data_set(dataset, parameters):
    """A loss that cannot be minimised is refused, on any data set (built in or not in any
    table), with the classes of the data loaded."""
    with sandbox() as root:
        (root / "flat.json").write_text(json.dumps(
            {"format": "domainbed-itl-loss", "version": 1, "family": "taylor", "order": 4,
             "parameters": parameters, "provenance": {}}, allow_nan=True))
        argv = ["meta", "--losses", "CE", root / "flat.json", "--seeds", "0", "--dataset",
                dataset, "--per_domain_cap", "20", *INNER, "--output_dir", root / "out"]
        assert run_checked(evaluate_loss.main, argv, root, []) == 2


def _fill(folder: Path) -> None:
    """Write files into `folder` until its file system is full."""
    with contextlib.suppress(OSError):
        for i in range(10 ** 4):
            (folder / f"filler{i}").write_bytes(b"x" * 4096)


@contextlib.contextmanager
def full_disk(root: Path) -> Iterator[Path]:
    """A folder on a full file system: a small tmpfs where this machine may mount one (as root),
    else a writer patched to fail as a full disk does."""
    disk = root / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
        capture_output=True).returncode == 0
    try:
        if mounted:
            (disk / "full").mkdir()
            _fill(disk / "full")
            yield disk
        else:
            real = os.fdopen

            class Full:
                def __init__(self, *args, **kwargs):
                    self.file = real(*args, **kwargs)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    self.file.close()

                def write(self, data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(atomic.os, "fdopen", Full)
                yield disk
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("command", ["meta_train", "evaluate_loss"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_made(command):
    main, base, _ = COMMANDS[command]
    with sandbox() as root, full_disk(root) as disk:
        before = sorted(p.name for p in disk.iterdir())
        code, err = call(main, [*base, "--output_dir", disk / "run" / "out"])
        check_boundary(code, err)
        assert code == 2 and "No space left on device writing" in err and str(disk / "run") in err, err
        assert sorted(p.name for p in disk.iterdir()) == before  # no folder, lock or temp file
        code, err = call(main, [*base, "--output_dir", disk / "run" / "out", "--resume"])
        assert code == 2, err


def test_sigterm_stops_a_command_as_ctrl_c_does_and_it_resumes(tmp_path):
    """SIGTERM mid-run: one line, exit 143, and the run resumes to the end."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "domainbed_itl.scripts.meta_train", *[str(a) for a in META[:-1]],
            "200", "--output_dir", str(out)]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.rstrip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in err
    done = load_checkpoint(out / "checkpoint.pt", META_RUN)["done"]
    code, err = call(meta_train.main, ["--resume", "--outer_steps", str(done + 1), "--no_progress",
                                       "--output_dir", out])
    assert code == 0, err
    assert len(read_metrics(out / "metrics.jsonl")) == done + 1


def test_the_hostile_pickle_runs_code_when_read_unchecked(tmp_path):
    """The hostile files above are hostile: an unchecked read runs their code."""
    marker = tmp_path / "marker"
    pickle.loads(hostile_bytes(marker, "pickle", {}))
    assert marker.exists()


@pytest.mark.skipif(not os.environ.get("DOMAINBED_ROOT"), reason="needs DOMAINBED_ROOT (a DomainBed "
                    "checkout)")
@pytest.mark.parametrize("how", ["pickle", "torch", "model_dict"])
def test_a_hostile_domainbed_model_is_refused_unread(tmp_path, how):
    """DomainBed's model.pkl is a third party's pickle: read with weights_only, a hostile one is
    refused in one line naming it, its code never run."""
    from domainbed_itl.bridge.trained_models import RunError, load_model

    marker, path = tmp_path / "marker", tmp_path / "model.pkl"
    path.write_bytes(hostile_bytes(marker, how, {"args": {"algorithm": "ERM"}}))
    with pytest.raises(RunError, match=f"{re.escape(str(path))} holds more than tensors") as error:
        load_model(path)
    assert "\n" not in str(error.value) and not marker.exists()


BAD_PLUGINS = {"missing": None, "raising": "raise RuntimeError('broken plugin')\n",
               "syntax": "def (\n"}


@pytest.mark.parametrize("bad", sorted(BAD_PLUGINS))
def test_a_bad_family_plugin_fails_where_a_family_is_used_and_nowhere_else(tmp_path, bad):
    """A module named in DOMAINBED_ITL_FAMILIES that is missing, raises or does not parse:
    the package imports and the commands that use no family of a plugin work; the first look-up
    of a family not built in is one line naming the variable and the module."""
    from domainbed_itl.losses.families import PLUGINS_ENV

    if BAD_PLUGINS[bad] is not None:
        (tmp_path / "bad_plugin.py").write_text(BAD_PLUGINS[bad])
    env = {**os.environ, PLUGINS_ENV: "bad_plugin",
           "PYTHONPATH": os.pathsep.join([str(Path(meta_train.__file__).parents[2]), str(tmp_path)])}
    shapes = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.loss_shapes", "--losses",
                             "CE", "ITL", "--points", "5", "--output_dir", str(tmp_path / "shapes")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert shapes.returncode == 0, shapes.stderr
    (tmp_path / "mine.json").write_text(json.dumps({"format": "domainbed-itl-loss", "version": 1,
                                                    "family": "user_family", "order": None,
                                                    "parameters": [0.5]}))
    used = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.loss_shapes", "--losses",
                           str(tmp_path / "mine.json"), "--output_dir", str(tmp_path / "mine")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert used.returncode == 2 and "Traceback" not in used.stderr, used.stderr
    line = used.stderr.strip().splitlines()[-1]
    assert f"{PLUGINS_ENV} names the module 'bad_plugin'" in line and len(
        used.stderr.strip().splitlines()) == 1, used.stderr
    assert not (tmp_path / "mine").exists()


class BroadcastGradient(torch.nn.Module):
    """A user's loss whose closed-form gradient is a broadcast (read-only, stride 0) tensor."""

    def forward(self, logits, target, reduction="mean"):
        values = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        return values if reduction == "none" else values.mean()

    def loss_and_grad(self, logits, target):
        values = self.forward(logits, target, "none")
        return values, torch.full((1, logits.shape[1]), 0.01).expand_as(logits)


@SOME
@given(batched=st.booleans(), optimizer=st.sampled_from(["sgd", "momentum", "adam"]))
def test_the_inner_loop_never_writes_into_a_losss_gradient(batched, optimizer):
    from domainbed_itl.meta import inner

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    params = inner.init_params(inner.mlp(3, (4,), 2), [0, 1], torch.device("cpu"))
    opt = inner.InnerOptimizer(optimizer, lr=0.1)
    state = opt.init_state(params)
    before = {k: v.clone() for k, v in params.items()}
    losses = inner.train(params, BroadcastGradient(), opt, state, x, y,
                         torch.randint(0, 12, (2, 3, 4)), batched=batched)
    assert losses.shape == (2, 3) and bool(torch.isfinite(losses).all())
    assert any(not torch.equal(before[k], params[k]) for k in params)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_a_read_only_folder_is_one_line_naming_the_path(tmp_path):
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine mounts no tmpfs")
    try:
        main, base, _ = COMMANDS["meta_train"]
        code, err = call(main, [*base, "--output_dir", disk / "run"])
        check_boundary(code, err)
        assert code == 2 and "Read-only file system" in err and str(disk / "run") in err, err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("how", ["pickle", "torch", "units"])
def test_a_hostile_pickle_in_a_grid_search_folder_is_refused_unread(how):
    main, base, _ = COMMANDS["grid_search"]
    with sandbox() as root:
        folder, marker = root / "grid", root / "marker"
        code, err = call(main, [*base, "--output_dir", folder])
        assert code == 0, err
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
        (folder / "checkpoint.pt").write_bytes(hostile_bytes(marker, how, checkpoint))
        for name in [p.name for p in folder.iterdir() if p.suffix in (".md", ".json", ".csv")]:
            (folder / name).unlink()  # so that the command continues from the checkpoint
        code, err = call(main, [*base, "--output_dir", folder])
        check_boundary(code, err)
        assert code == 2 and str(folder / "checkpoint.pt") in err and not marker.exists(), err
