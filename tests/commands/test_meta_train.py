"""The meta_train and plot_meta commands: bad flags named, runs killed or interrupted and
resumed bit for bit, resume from the folder alone, old checkpoints, a second writer, plots, and
a run on DomainBed's RotatedMNIST."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from domainbed_itl.bridge.domainbed_env import DomainBedNotFound
from domainbed_itl.losses import LossSpec, get_family, load_loss, save_loss
from domainbed_itl.files.runfolder import RunDirError
from domainbed_itl.meta.data import synthetic_dataset
from domainbed_itl.meta.runner import META_RUN, data_fingerprint, run_meta_training
from domainbed_itl.meta.config import MetaConfig, preset_config
from domainbed_itl.meta.trainer import MetaTrainer
from domainbed_itl.scripts._search import new_settings
from domainbed_itl.scripts import meta_train, plot_meta

REPO = Path(__file__).resolve().parents[2]
from conftest import meta_checkpoint as _checkpoint, \
    tiny_config as _config, tiny_data as _data, untimed as _untimed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------ command line

CLI_TINY = ["--dataset", "synthetic", "--per_domain_cap", "48", "--inner_steps", "8",
            "--hidden", "8", "--hvp_batch", "32", "--outer_lr", "0.0001", "--no_progress"]


@pytest.mark.parametrize("argv,message", [
    (["--family", "taylor7"], "argument --family: invalid choice: 'taylor7'"),
    (["--family", "taylor", "--order", "7"], r"order must be an integer in \[2, 5\], got 7"),
    (["--family", "taylor"], "--family taylor needs --order"),
    (["--family", "taylor4", "--order", "5"], "--family taylor4 conflicts with --order 5"),
    (["--family", "sce", "--order", "2"], "--family sce takes no --order"),
    (["--family", "poly"], r"--family poly needs --order in \[1, 10\] \(or use --family poly1..poly10\)"),
    (["--family", "poly", "--order", "11"], r"poly order must be an integer in \[1, 10\], got 11"),
    (["--family", "focal2"], "argument --family: invalid choice: 'focal2'"),
    (["--order", "3"], "--order 3 needs a --family with orders"),
    (["--init", "ITL", "--family", "poly1"], "--init ITL holds a taylor loss of order 4, but --family asks "
                                             "for poly of order 1"),
    (["--outer_steps", "0"], "argument --outer_steps: expected a positive integer, got '0'"),
    (["--inner_steps", "-5"], "argument --inner_steps: expected a positive integer, got '-5'"),
    (["--outer_lr", "inf"], "argument --outer_lr: expected a positive finite number, got 'inf'"),
    (["--hidden", "256,x"], "expected comma-separated positive hidden widths"),
    (["--aggregate", "sum"], "argument --aggregate: invalid choice: 'sum'"),
    (["--init", "no/such/loss.json"], "neither a preset loss"),
    (["--init", "ITL", "--family", "sce"], "--init ITL holds a taylor loss of order 4"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--inner_stop_ratio", "1.5"], r"inner_stop_ratio must be None \(no stopping rule\) or a number "
                                    r"in \(0, 1\)"),
    (["--inner_weight_decay", "-1"], "argument --inner_weight_decay: expected a finite number >= 0, "
                                     "got '-1'"),
    (["--inner_schedule", "exp"], "argument --inner_schedule: invalid choice: 'exp'"),
    (["--neumann_power_iters", "5"], "neumann_power_iters 5 makes α differ per domain, which needs "
                                     "neumann_form 'inverse'"),
    (["--solver_damping", "nan"], "argument --solver_damping: expected a finite number >= 0"),
    (["--device", "meta"], "--device meta: only cpu and cuda devices are supported"),
    (["--device", "cuda:7"], "--device cuda:7: (CUDA is not available|this machine has [0-6] CUDA)"),
])
def test_cli_rejects_bad_arguments_by_name(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        meta_train.main(CLI_TINY + ["--output_dir", str(tmp_path / "out")] + argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_every_setting_has_a_flag():
    assert set(MetaConfig().flat()) - set(meta_train.CONFIG_FLAGS) == {"family", "order"}


def test_cli_runs_the_stationary_preset_and_records_convergence(tmp_path):
    argv = ["--preset", "stationary", "--dataset", "synthetic", "--per_domain_cap", "48",
            "--inner_steps", "200", "--inner_stop_every", "20", "--inner_stop_ratio", "0.3",
            "--hidden", "8", "--hvp_batch", "32", "--eval_size", "64", "--neumann_steps", "20",
            "--spectrum_iters", "5", "--outer_steps", "2", "--no_progress",
            "--output_dir", str(tmp_path)]
    assert meta_train.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    config = MetaConfig.from_dict(_checkpoint(tmp_path / "checkpoint.pt")["config"]).flat()
    assert (config["inner_schedule"], config["inner_stop_ratio"], config["neumann_power_iters"],
            config["inner_steps"]) == ("cosine", 0.3, 20, 200)
    for r in records:
        assert len(r["per_domain"]["stationarity"]) == len(r["per_domain"]["inner_steps_used"]) == 6
        assert all(u <= 200 for u in r["per_domain"]["inner_steps_used"])
        assert {"hessian_lambda_max", "hessian_lambda_min", "source_heldout_gap"} <= set(r)


@pytest.mark.parametrize("argv, family", [
    (["--family", "taylor4"], ("taylor", 4)), (["--family", "taylor", "--order", "3"], ("taylor", 3)),
    (["--family", "sce"], ("sce", None)), (["--family", "poly1"], ("poly", 1)),
    (["--family", "poly", "--order", "3"], ("poly", 3)), (["--family", "focal"], ("focal", None)),
    (["--family", "label_smoothing"], ("label_smoothing", None)), (["--family", "gce"], ("gce", None)),
    ([], ("taylor", 4)),  # the preset's
])
def test_cli_takes_every_registered_family(tmp_path, argv, family):
    args = meta_train.build_parser().parse_args(["--output_dir", str(tmp_path), *argv])
    config = new_settings(args, meta_train.CONFIG_FLAGS, "meta_train").config
    assert (config.family, config.order) == family


def test_cli_protects_output_dir_and_reports_missing_domainbed(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert meta_train.main(CLI_TINY + ["--output_dir", str(tmp_path / "used")]) == 2
    assert "is not empty" in capsys.readouterr().err
    code = meta_train.main(["--dataset", "RotatedMNIST", "--domainbed_root", str(tmp_path),
                            "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "new")])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not a DomainBed checkout" in err and "github.com/facebookresearch/DomainBed" in err
    code = meta_train.main(["--dataset", "RotatedMNIST", "--output_dir", str(tmp_path / "new")])
    assert code == 2
    assert "--dataset RotatedMNIST needs --data_dir" in capsys.readouterr().err
    with pytest.raises(DomainBedNotFound):
        from domainbed_itl.bridge.domainbed_data import load_domainbed_domains
        load_domainbed_domains("RotatedMNIST", tmp_path, domainbed_root=tmp_path)


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "domainbed_itl.scripts.meta_train", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


# The guard refuses every solve of so tiny a problem (residuals near 1): lifted, so that ω moves
# and the bitwise comparisons below compare something.
CLI_MOVING = CLI_TINY + ["--inner_steps", "30", "--max_solver_residual", "1e12"]


def _stop_part_way(args, output_dir, sig):
    """Start a run of many outer steps, send `sig` once it has recorded two, and return
    (the process's stderr, the steps its checkpoint holds)."""
    run = _cli(args + ["--outer_steps", "1000", "--output_dir", str(output_dir)])
    metrics = output_dir / "metrics.jsonl"
    deadline = time.time() + 900  # two steps take seconds, but minutes on a loaded shared machine
    while time.time() < deadline and run.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    run.send_signal(sig)
    _, err = run.communicate(timeout=300)
    assert run.returncode in (130, -signal.SIGKILL), err
    return err, _checkpoint(output_dir / "checkpoint.pt")["trainer"]["steps_done"]


def _same_as_uninterrupted(args, tmp_path, steps):
    """The resumed run in tmp_path/cut ends where a run of `steps` outer steps from the start
    ends, with ω moved away from its start."""
    full = _cli(args + ["--outer_steps", str(steps), "--output_dir", str(tmp_path / "full")])
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    final = [_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("full", "cut")]
    assert torch.equal(final[0]["trainer"]["omega"], final[1]["trainer"]["omega"])
    assert not torch.equal(final[0]["trainer"]["omega"], torch.as_tensor(final[0]["init_omega"]))
    assert (load_loss(tmp_path / "cut" / "loss.json").parameters
            == load_loss(tmp_path / "full" / "loss.json").parameters)


def test_cli_killed_run_resumes_bitwise(tmp_path):
    args = CLI_MOVING + ["--seed", "3"]
    _, steps_at_kill = _stop_part_way(args, tmp_path / "cut", signal.SIGKILL)
    assert steps_at_kill >= 2, "the run should be killed part-way"
    target = steps_at_kill + 2
    resumed = _cli(args + ["--outer_steps", str(target), "--output_dir", str(tmp_path / "cut"),
                           "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{target} outer steps" in out
    _same_as_uninterrupted(args, tmp_path, target)


def test_cli_interrupted_run_says_so_in_one_line_and_resumes_bitwise(tmp_path):
    args = CLI_MOVING + ["--seed", "4"]
    err, steps_done = _stop_part_way(args, tmp_path / "cut", signal.SIGINT)  # Ctrl-C
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"interrupted: the run in {tmp_path / 'cut'} can be "
                                            "resumed with --resume")
    target = steps_done + 2
    resumed = _cli(["--output_dir", str(tmp_path / "cut"), "--resume", "--no_progress",
                    "--outer_steps", str(target)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"{target} outer steps" in out, err
    _same_as_uninterrupted(args, tmp_path, target)


def _main(argv, capsys):
    code = meta_train.main(argv)
    return code, capsys.readouterr().err


def test_cli_resume_needs_only_the_folder_and_keeps_the_original_command(tmp_path, capsys):
    init = tmp_path / "init.json"
    start = [v * 1.1 for v in get_family("taylor", 4).default_parameters(3)]
    save_loss(init, LossSpec("taylor", 4, start))
    first = CLI_TINY + ["--init", str(init), "--outer_steps", "2", "--output_dir", str(tmp_path / "cut")]
    assert meta_train.main(first) == 0
    init.unlink()  # the checkpoint holds the initial loss
    assert meta_train.main(first + ["--resume"]) == 0  # the same command again: nothing to do
    resume = ["--output_dir", str(tmp_path / "cut"), "--resume", "--outer_steps", "3", "--no_progress"]
    assert meta_train.main(resume) == 0
    save_loss(init, LossSpec("taylor", 4, start))
    assert meta_train.main(first[:-2] + ["--outer_steps", "3", "--output_dir", str(tmp_path / "full")]) == 0
    final = [_checkpoint(tmp_path / d / "checkpoint.pt")["trainer"]["omega"] for d in ("full", "cut")]
    assert torch.equal(final[0], final[1])
    provenance = load_loss(tmp_path / "cut" / "loss.json").provenance
    assert provenance["command"] == meta_train_command(first) and provenance["steps"] == 3
    (entry,) = provenance["resumed"]
    assert entry["command"] == meta_train_command(resume) and entry["from_step"] == 2
    assert provenance["init"] == str(init) and provenance["data_flags"]["dataset"] == "synthetic"
    capsys.readouterr()
    code, err = _main(resume[:3] + ["--init", "ITL"], capsys)
    assert code == 2 and f"--init ITL contradicts the checkpoint's initial loss ({init})" in err


@pytest.mark.parametrize("flags,message", [
    (["--inner_lr", "0.02"], "--inner_lr 0.02 contradicts the checkpoint's inner_lr 0.01"),
    (["--hidden", "16"], "--hidden 16 contradicts the checkpoint's hidden 8"),
    (["--no-batched"], "--no-batched contradicts the checkpoint's batched True"),
    (["--dataset", "RotatedMNIST"], "--dataset RotatedMNIST contradicts the checkpoint's dataset synthetic"),
    (["--preset", "paper"], "--preset paper contradicts the checkpoint's preset paper_guarded"),
    (["--family", "sce"], "--family sce contradicts the checkpoint's family taylor (order 4)"),
    (["--outer_steps", "1"], "to 1 outer steps: the run has done 2 already"),
    (["--device", "meta"], "--device meta: only cpu and cuda devices are supported"),
])
def test_cli_resume_refuses_flags_that_contradict_the_checkpoint(tmp_path, capsys, flags, message):
    assert meta_train.main(CLI_TINY + ["--outer_steps", "2", "--output_dir", str(tmp_path)]) == 0
    before = {name: (tmp_path / name).read_bytes() for name in META_RUN.outputs}
    capsys.readouterr()
    code, err = _main(["--output_dir", str(tmp_path), "--resume", *flags], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert message in line
    assert {name: (tmp_path / name).read_bytes() for name in META_RUN.outputs} == before


def test_a_resume_on_another_device_type_is_refused_naming_both(tmp_path, capsys):
    data = _data()
    run_meta_training(data, _config(outer_steps=1), tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt")
    assert ckpt["device"] == "cpu"
    torch.save({**ckpt, "device": "cuda"}, tmp_path / "checkpoint.pt")  # as a GPU run leaves it
    with pytest.raises(RunDirError, match="on cpu: it was written on cuda; resume it on cuda"):
        run_meta_training(data, _config(outer_steps=2), tmp_path, resume=True, progress=False)
    if not torch.cuda.is_available():
        code, err = _main(["--output_dir", str(tmp_path), "--resume"], capsys)
        assert code == 2 and "it ran on cuda (--device cuda: CUDA is not available" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_checkpoint_loads_with_a_plain_torch_load_without_a_gpu(tmp_path):
    run_meta_training(_data(), _config(outer_steps=2, outer_optimizer="adam", warm_start=True),
                      tmp_path, device="cuda", progress=False)
    check = ("import sys, torch\n"
             "assert not torch.cuda.is_available()\n"
             "ckpt = torch.load(sys.argv[1])\n"
             "assert ckpt['device'] == 'cuda' and ckpt['trainer']['optimizer']['state']\n")
    run = subprocess.run([sys.executable, "-c", check, str(tmp_path / "checkpoint.pt")],
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _version1_run(folder, data, config, steps):
    """A run folder as domainbed-itl left it before checkpoint version 2: the version-1 layout
    (no device, provenance, unit or done), its metrics.jsonl and loss.json."""
    trainer = MetaTrainer(data.domains, data.num_classes, config)
    init_omega = trainer.omega.tolist()
    records = [trainer.outer_step() for _ in range(steps)]
    folder.mkdir()
    torch.save({"format": META_RUN.format, "version": 1, "package_version": "0.1.0",
                "config": config.flat(), "data": data_fingerprint(data), "init_omega": init_omega,
                "trainer": trainer.state_dict(), "metrics": records}, folder / "checkpoint.pt")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    save_loss(folder / "loss.json", LossSpec(config.family, config.order, trainer.omega.tolist(),
                                             {"command": "the first command"}))


def test_version_1_checkpoints_resume_with_the_values_of_their_time(tmp_path, capsys):
    """Version 1 recorded no device (not checked then), no provenance (the resuming command's,
    as then) and no data flags (the flags', as then)."""
    argv = CLI_TINY + ["--seed", "2"]
    config = preset_config(meta_train.DEFAULT_PRESET, {
        "inner_steps": 8, "hidden": (8,), "hvp_batch": 32, "outer_lr": 0.0001, "seed": 2})
    _version1_run(tmp_path / "old", synthetic_dataset(per_domain=48, seed=0), config, steps=2)
    assert meta_train.main(argv + ["--outer_steps", "3", "--output_dir", str(tmp_path / "full")]) == 0
    again = argv + ["--outer_steps", "3", "--output_dir", str(tmp_path / "old"), "--resume"]
    assert meta_train.main(again) == 0
    final = [_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("full", "old")]
    assert torch.equal(final[0]["trainer"]["omega"], final[1]["trainer"]["omega"])
    assert [_untimed(r) for r in final[1]["metrics"]] == [_untimed(r) for r in final[0]["metrics"]]
    provenance = load_loss(tmp_path / "old" / "loss.json").provenance
    assert provenance["command"] == meta_train_command(again) and "resumed" not in provenance
    assert final[1]["version"] == 2 and final[1]["device"] == "cpu"
    assert run_meta_training(synthetic_dataset(per_domain=48, seed=0),
                             dataclasses.replace(config, outer_steps=4), tmp_path / "old",
                             resume=True, progress=False, provenance={"command": "later"}).steps_done == 4
    provenance = load_loss(tmp_path / "old" / "loss.json").provenance
    assert provenance["command"] == meta_train_command(again)
    assert [r["command"] for r in provenance["resumed"]] == ["later"]


def meta_train_command(argv):
    return shlex.join(["python", "-m", "domainbed_itl.scripts.meta_train", *argv])


def test_cli_stops_on_non_finite_values(tmp_path):
    # --preset paper: the default's residual guard would refuse the steps before ω blows up
    proc = _cli(CLI_TINY + ["--preset", "paper", "--outer_steps", "3", "--outer_optimizer", "adam",
                            "--outer_lr", "1e30", "--output_dir", str(tmp_path)])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "error: outer step 2: non-finite inner training loss" in err
    assert "Traceback" not in err
    assert load_loss(tmp_path / "loss.json").provenance["steps"] == 1


def test_cli_refuses_a_second_writer_by_name(tmp_path):
    first = _cli(CLI_TINY + ["--outer_steps", "1000", "--output_dir", str(tmp_path)])
    holder = tmp_path / ".domainbed_itl.lock.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (tmp_path / "checkpoint.pt").exists():
        time.sleep(0.05)
    try:
        assert holder.exists(), first.communicate(timeout=5)
        for flag in ("--overwrite", "--resume"):
            second = _cli(CLI_TINY + ["--outer_steps", "2", "--output_dir", str(tmp_path), flag])
            _, err = second.communicate(timeout=300)
            assert second.returncode == 2 and "Traceback" not in err
            (line,) = err.splitlines()
            assert line.startswith(f"error: {tmp_path} is being written by another process "
                                   f"(process {first.pid} on ")
            assert f"--outer_steps 1000 --output_dir {tmp_path}" in line
            assert not (tmp_path / ".domainbed_itl.replaced").exists()
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert load_loss(tmp_path / "loss.json").provenance["steps"] >= 1


def test_cli_overwrite_that_fails_at_once_keeps_the_previous_run(tmp_path):
    done = _cli(CLI_TINY + ["--outer_steps", "2", "--output_dir", str(tmp_path)])
    assert done.wait(timeout=300) == 0
    before = (tmp_path / "loss.json").read_bytes()
    failed = _cli(CLI_TINY + ["--outer_steps", "2", "--inner_lr", "1e30", "--overwrite",
                              "--output_dir", str(tmp_path)])
    _, err = failed.communicate(timeout=300)
    assert failed.returncode == 1 and "Traceback" not in err
    assert "--overwrite kept the previous run (2 outer steps, checkpoint.pt" in err
    assert (tmp_path / "loss.json").read_bytes() == before


# ----------------------------------------------------------------------------------- plots


def test_plot_meta_writes_a_png(tmp_path):
    run_meta_training(_data(), _config(outer_steps=2), tmp_path, progress=False)
    assert plot_meta.main([str(tmp_path / "metrics.jsonl"), "--output", str(tmp_path / "c.png")]) == 0
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    assert plot_meta.main([str(tmp_path / "bad.jsonl")]) == 2


@pytest.mark.domainbed
@pytest.mark.slow
def test_cli_meta_trains_on_domainbed_rotated_mnist(tmp_path, domainbed_root, mnist10k):
    proc = _cli(["--dataset", "RotatedMNIST", "--data_dir", str(mnist10k), "--domainbed_root",
                 str(domainbed_root), "--per_domain_cap", "64", "--outer_steps", "2",
                 "--inner_steps", "10", "--hidden", "16", "--hvp_batch", "32", "--batched",
                 "--output_dir", str(tmp_path)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    spec = load_loss(tmp_path / "loss.json")
    assert (spec.family, spec.order, len(spec.parameters)) == ("taylor", 4, 12)
    assert spec.provenance["meta_train_dataset"] == "RotatedMNIST"
    assert spec.provenance["steps"] == 2
    assert spec.provenance["data"]["environments"] == ["0", "15", "30", "45", "60", "75"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert dataclasses.asdict(MetaConfig()).keys() == spec.provenance["meta_config"].keys()
