"""The loss evaluation: the meta protocol's pairing, its command, the DomainBed protocol, and an
end-to-end search whose learned loss beats its initial loss."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from domainbed_itl.analysis import comparison
from domainbed_itl.bridge.loss_evaluation import (DomainBedProtocol, parse_losses, plan_jobs,
                                                   training_domain_validation)
from domainbed_itl.losses import ITL_PARAMETERS, LossSpec, TaylorLoss, save_loss
from domainbed_itl.meta import synthetic_domains
from domainbed_itl.meta.evaluate import Protocol, evaluate_losses
from domainbed_itl.meta.config import preset_config
from domainbed_itl.meta.trainer import MetaTrainer
from domainbed_itl.scripts import evaluate_loss

from conftest import domainbed_env, processes_naming

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]

PROTOCOL = Protocol(inner_steps=(15, 30), hidden=(8,), batch_size=16, eval_size=50)


def _data():
    return synthetic_domains(3, 40, 10, 3, seed=0, noise=1.5, degrees_per_domain=20)


def test_losses_meet_the_same_networks_and_data():
    itl = TaylorLoss(ITL_PARAMETERS, 4, backend="torch")
    records = evaluate_losses(_data(), {"CE": F.cross_entropy, "CE again": F.cross_entropy,
                                        "ITL": itl}, [0, 1], PROTOCOL)
    assert len(records) == 3 * 2 * 3 * 2  # losses x seeds x domains x lengths

    def rows(loss):
        return [{k: v for k, v in r.items() if k != "loss"} for r in records if r["loss"] == loss]

    assert rows("CE") == rows("CE again")  # same seed: same initial weights and minibatches
    assert rows("CE") != rows("ITL")
    first = [r for r in rows("CE") if r["unit"] == 0]
    second = [r for r in rows("CE") if r["unit"] == 1]
    assert [r["heldout_ce"] for r in first] != [r["heldout_ce"] for r in second]
    for r in records:
        assert r["gap"] == pytest.approx(r["source_acc"] - r["heldout_acc"])


def test_reading_off_at_several_lengths_equals_separate_runs():
    data = _data()
    both = evaluate_losses(data, {"CE": F.cross_entropy}, [3], PROTOCOL)
    alone = evaluate_losses(data, {"CE": F.cross_entropy}, [3],
                            Protocol(inner_steps=(30,), hidden=(8,), batch_size=16, eval_size=50))
    assert [r for r in both if r["inner_steps"] == 30] == alone


def test_protocol_rejects_bad_values():
    with pytest.raises(ValueError, match="inner_steps must be positive"):
        Protocol(inner_steps=(0,))
    with pytest.raises(ValueError, match="unknown inner optimizer 'rmsprop'"):
        Protocol(inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"inner_stop_ratio must be None .* got 0"):
        Protocol(inner_stop_ratio=0)
    with pytest.raises(ValueError, match="unknown inner_schedule 'exp'"):
        Protocol(inner_schedule="exp")


CONVERGED = dict(hidden=(8,), batch_size=16, eval_size=50, inner_lr=0.3, inner_schedule="cosine",
                 inner_weight_decay=1e-2, inner_stop_ratio=0.3, inner_stop_every=10)


def test_at_convergence_every_cap_is_its_own_training_to_the_stopping_rule():
    """With an annealed rate and a stopping rule, each length is a cap trained from the same
    start: the longest gives the records of an evaluation at that cap alone (the shorter
    training before it changes nothing); networks that met the rule record fewer steps and a
    stationarity at or below the ratio, the others their cap."""
    data = _data()
    both = evaluate_losses(data, {"CE": F.cross_entropy}, [3],
                           Protocol(inner_steps=(40, 200), **CONVERGED))
    alone = evaluate_losses(data, {"CE": F.cross_entropy}, [3],
                            Protocol(inner_steps=(200,), **CONVERGED))
    long = [r for r in both if r["inner_steps"] == 200]
    assert long == alone
    assert all(r["inner_steps_used"] <= 40 for r in both if r["inner_steps"] == 40)
    assert any(r["inner_steps_used"] < 200 for r in long)
    for r in both:
        if r["inner_steps_used"] < r["inner_steps"]:
            assert r["inner_steps_used"] % 10 == 0 and r["stationarity"] <= 0.3
        else:
            assert r["stationarity"] > 0.3 * (1 - 1e-6)


def test_without_a_rule_the_records_say_every_step_was_used_and_decay_changes_training():
    data = _data()
    plain = evaluate_losses(data, {"CE": F.cross_entropy}, [0], PROTOCOL)
    assert all(r["inner_steps_used"] == r["inner_steps"] and "stationarity" not in r for r in plain)
    decayed = evaluate_losses(data, {"CE": F.cross_entropy}, [0], Protocol(
        inner_steps=(15, 30), hidden=(8,), batch_size=16, eval_size=50, inner_weight_decay=0.5))
    assert [r["final_train_loss"] for r in decayed] != [r["final_train_loss"] for r in plain]


def test_a_learned_loss_beats_its_initial_loss_end_to_end():
    """The paper preset on synthetic rotated domains: 12 outer steps lift held-out accuracy of
    fresh networks, trained as in the search, on every one of 5 paired seeds."""
    data = synthetic_domains(4, 60, 16, 4, seed=0, noise=1.5, degrees_per_domain=20)
    config = preset_config("paper", {"outer_steps": 12, "inner_steps": 40, "hidden": (16,),
                                     "hvp_batch": 64, "batched": True})
    trainer = MetaTrainer(data.domains, data.num_classes, config)
    initial = trainer.omega.tolist()
    for _ in range(config.outer_steps):
        trainer.outer_step()
    losses = {"initial": trainer.family.module(initial),
              "learned": trainer.family.module(trainer.omega.tolist())}
    records = evaluate_losses(data, losses, [0, 1, 2, 3, 4],
                              Protocol(inner_steps=(40,), hidden=(16,)))
    diff = comparison.compare(records, "heldout_acc", "initial")[("learned",)]["difference"]
    assert diff.wins == 5 and diff.mean > 0.2 and diff.t_pvalue < 0.01


def test_meta_command_writes_tables_and_refuses_to_overwrite(tmp_path, capsys):
    argv = ["meta", "--dataset", "synthetic", "--per_domain_cap", "40", "--losses", "CE",
            "preset=ITL", "--seeds", "0", "1", "--inner_steps", "5", "--hidden", "4",
            "--output_dir", str(tmp_path)]
    assert evaluate_loss.main(argv) == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["reference"] == "CE" and report["losses"] == {"CE": "CE", "preset": "ITL"}
    assert len(report["records"]) == 2 * 2 * 6
    md = (tmp_path / "evaluation.md").read_text()
    assert "| preset | 5 |" in md and "Δ vs CE" in md
    capsys.readouterr()
    assert evaluate_loss.main(argv) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    assert evaluate_loss.main(argv + ["--overwrite"]) == 0


def test_meta_command_evaluates_at_convergence_and_reports_the_steps_taken(tmp_path):
    argv = ["meta", "--dataset", "synthetic", "--per_domain_cap", "40", "--losses", "CE", "ITL",
            "--seeds", "0", "--inner_steps", "60", "--hidden", "4", "--inner_lr", "0.3",
            "--inner_schedule", "cosine", "--inner_weight_decay", "0.01", "--inner_stop_ratio",
            "0.5", "--inner_stop_every", "10", "--output_dir", str(tmp_path)]
    assert evaluate_loss.main(argv) == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert (report["settings"]["inner_schedule"], report["settings"]["inner_stop_ratio"]) == (
        "cosine", 0.5)
    assert all("stationarity" in r and r["inner_steps_used"] <= 60 for r in report["records"])
    md = (tmp_path / "evaluation.md").read_text()
    assert "### inner steps used" in md and "### stationarity (final / start gradient norm)" in md
    bad = argv[:-1] + [str(tmp_path / "bad")]
    bad[bad.index("0.5")] = "2"
    assert evaluate_loss.main(bad) == 2


def test_meta_command_takes_poly1_and_a_loss_file_of_any_family(tmp_path):
    from domainbed_itl.losses import LossSpec, save_loss

    focal = save_loss(tmp_path / "focal.json", LossSpec("focal", None, [1.0]))
    poly = save_loss(tmp_path / "poly2.json", LossSpec("poly", 2, [1.0, 0.5]))
    out = tmp_path / "eval"
    assert evaluate_loss.main(["meta", "--dataset", "synthetic", "--per_domain_cap", "40", "--losses",
                               "CE", "Poly1", f"focal={focal}", f"poly={poly}", "--seeds", "0",
                               "--inner_steps", "5", "--hidden", "4", "--output_dir", str(out)]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["losses"] == {"CE": "CE", "Poly1": "Poly1", "focal": str(focal), "poly": str(poly)}
    by_loss = {}
    for record in report["records"]:
        by_loss.setdefault(record["loss"], []).append(record["heldout_ce"])
    assert len(by_loss) == 4 and len({tuple(v) for v in by_loss.values()}) == 4  # four different losses
    args = evaluate_loss.build_parser().parse_args(
        ["domainbed", "--losses", "Poly1", str(poly), "--test_envs", "0", "--n_trials", "1", "--data_dir",
         str(tmp_path), "--output_dir", str(tmp_path)])
    losses, _ = parse_losses(args.losses, args.reference, args.dataset)
    protocol = DomainBedProtocol(args.dataset, args.data_dir, tuple(args.test_envs), args.n_trials)
    jobs = plan_jobs(protocol, losses, lambda *a: 0)
    planned = {label: train_args for train_args, label, *_ in jobs}
    assert planned["Poly1"]["algorithm"] == "ERM_Poly1" and "hparams" not in planned["Poly1"]
    assert planned[str(poly)]["algorithm"] == "ITL"
    assert json.loads(planned[str(poly)]["hparams"]) == {"itl_loss": str(poly.resolve())}


def _evaluate(argv, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "domainbed_itl.scripts.evaluate_loss", *argv],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_an_interrupted_meta_evaluation_continues_where_it_stopped(tmp_path):
    argv = ["meta", "--dataset", "synthetic", "--per_domain_cap", "40", "--losses", "CE", "ITL",
            "--seeds", "0", "1", "2", "3", "--inner_steps", "300", "--hidden", "4", "--no_progress"]
    full = _evaluate(argv + ["--output_dir", str(tmp_path / "full")])
    stopped = _evaluate(argv + ["--output_dir", str(tmp_path / "cut")])
    deadline = time.time() + 900
    while time.time() < deadline and stopped.poll() is None:
        if (tmp_path / "cut" / "checkpoint.pt").exists():
            break
        time.sleep(0.01)
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("interrupted: run the same command again to continue "
                                            f"the evaluation in {tmp_path / 'cut'}")
    kept = torch.load(tmp_path / "cut" / "checkpoint.pt")["units"]
    assert 1 <= len(kept) < 8 and not (tmp_path / "cut" / "evaluation.json").exists()
    again = _evaluate(argv + ["--output_dir", str(tmp_path / "cut")])
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert full.wait(timeout=600) == 0
    reports = [json.loads((tmp_path / d / "evaluation.json").read_text()) for d in ("full", "cut")]
    assert reports[0]["records"] == reports[1]["records"] and len(reports[1]["records"]) == 2 * 4 * 6
    units = torch.load(tmp_path / "cut" / "checkpoint.pt")["units"]
    assert [(u["unit"], u["loss"]) for u in units[:len(kept)]] == [(u["unit"], u["loss"]) for u in kept]


def test_the_meta_protocol_shows_its_units_and_time_left_unless_told_not_to(tmp_path, capsys):
    argv = ["meta", "--dataset", "synthetic", "--per_domain_cap", "40", "--losses", "CE", "ITL",
            "--seeds", "0", "--inner_steps", "5", "--hidden", "4"]
    assert evaluate_loss.main(argv + ["--output_dir", str(tmp_path / "a")]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert bar.startswith("evaluate: 100%") and "2/2 [" in bar and "<00:00" in bar
    assert evaluate_loss.main(argv + ["--output_dir", str(tmp_path / "b"), "--no_progress"]) == 0
    assert "evaluate:" not in capsys.readouterr().err


def test_a_meta_evaluation_refuses_to_mix_units_of_other_settings(tmp_path, capsys):
    learned = tmp_path / "learned.json"
    save_loss(learned, LossSpec("taylor", 4, ITL_PARAMETERS))
    out = tmp_path / "eval"
    argv = ["meta", "--dataset", "synthetic", "--per_domain_cap", "40", "--losses", "CE",
            f"mine={learned}", "--seeds", "0", "--inner_steps", "5", "--hidden", "4",
            "--no_progress", "--output_dir", str(out)]
    assert evaluate_loss.main(argv) == 0
    for name in ("evaluation.md", "evaluation.json"):  # as an interrupted evaluation leaves it
        (out / name).unlink()
    capsys.readouterr()
    assert evaluate_loss.main(argv + ["--inner_lr", "0.02"]) == 2
    assert "with different settings: inner_lr: 0.01 in the checkpoint, 0.02 now" in capsys.readouterr().err
    save_loss(learned, LossSpec("taylor", 4, [2 * v for v in ITL_PARAMETERS]), overwrite=True)
    assert evaluate_loss.main(argv) == 2
    assert "finished units of loss 'mine' were computed with" in capsys.readouterr().err
    save_loss(learned, LossSpec("taylor", 4, ITL_PARAMETERS), overwrite=True)
    assert evaluate_loss.main(argv[:9] + ["1"] + argv[9:]) == 0  # one more seed: two more units
    ckpt = torch.load(out / "checkpoint.pt")
    assert [(u["unit"], u["loss"]) for u in ckpt["units"]] == [(0, "CE"), (0, "mine"), (1, "CE"),
                                                               (1, "mine")]
    assert ckpt["provenance"]["resumed"][0]["from_step"] == 2


@pytest.mark.parametrize("losses,message", [
    (["CE", "nope.json"], "--losses entry 'nope.json'"),
    (["CE", "x=CE", "x=ITL"], "names 'x' twice"),
])
def test_meta_command_names_bad_losses(tmp_path, capsys, losses, message):
    code = evaluate_loss.main(["meta", "--dataset", "synthetic", "--losses", *losses,
                               "--output_dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "evaluation.md").exists()


def test_reference_must_be_a_given_loss(tmp_path, capsys):
    assert evaluate_loss.main(["meta", "--dataset", "synthetic", "--losses", "CE", "ITL",
                               "--reference", "Focal", "--output_dir", str(tmp_path)]) == 2
    assert "--reference 'Focal' is not one of the --losses labels CE, ITL" in capsys.readouterr().err


@pytest.mark.domainbed
@pytest.mark.slow
def test_domainbed_protocol_runs_domainbeds_train_paired_and_reports(patched_domainbed, tmp_path):
    out = tmp_path / "eval"
    argv = [sys.executable, "-m", "domainbed_itl.scripts.evaluate_loss", "domainbed",
            "--dataset", "Debug28", "--data_dir", str(tmp_path), "--domainbed_root",
            str(patched_domainbed), "--losses", "CE", "ITL", "--test_envs", "0", "--n_trials", "2",
            "--steps", "3", "--checkpoint_freq", "2", "--hparams", '{"batch_size": 8}',
            "--output_dir", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, env=domainbed_env(patched_domainbed),
                         timeout=900)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "evaluation.json").read_text())
    assert not report["missing"] and len(report["records"]) == 4
    results = {}
    for folder in [p for p in out.iterdir() if p.is_dir()]:
        first = json.loads((folder / "results.jsonl").read_text().splitlines()[0])
        results[folder.name] = first["args"]
    by_trial = {}
    for args in results.values():
        by_trial.setdefault(args["trial_seed"], set()).add((args["algorithm"], args["seed"]))
    for pairs in by_trial.values():  # CE (ERM) and ITL share the seed within a trial
        assert {a for a, _ in pairs} == {"ERM", "ITL"} and len({s for _, s in pairs}) == 1
    again = subprocess.run(argv + ["--report_only"], capture_output=True, text=True,
                           env=domainbed_env(patched_domainbed), timeout=600)
    assert again.returncode == 0 and "4 jobs, 0 to launch" in again.stdout
    damaged = next(p for p in out.iterdir() if p.is_dir()) / "results.jsonl"
    lines = damaged.read_text().splitlines()
    damaged.write_text("\n".join([lines[0], "42", *lines[1:]]) + "\n")
    third = subprocess.run(argv + ["--report_only"], capture_output=True, text=True,
                           env=domainbed_env(patched_domainbed), timeout=600)
    assert third.returncode == 0, third.stderr
    assert f"Damaged records (skipped):\n\n- {damaged}:2: not a JSON object but 42" in third.stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert len(report["records"]) == 4 and report["damaged"] == [f"{damaged}:2: not a JSON object but 42"]
    # An interrupted launch leaves empty folders for jobs that never started: they run next time.
    never_started = sorted(p for p in out.iterdir() if p.is_dir() and p != damaged.parent)[0]
    shutil.rmtree(never_started)
    never_started.mkdir()
    rerun = subprocess.run(argv, capture_output=True, text=True, env=domainbed_env(patched_domainbed),
                           timeout=900)
    assert rerun.returncode == 0 and "4 jobs, 1 to launch" in rerun.stdout, rerun.stderr
    assert (never_started / "done").exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_terminated_domainbed_evaluation_stops_its_job_and_reruns_it(patched_domainbed, tmp_path):
    """SIGTERM to the command alone (a scheduler's stop, `kill`), not to its process group: the
    running DomainBed job stops with it (DomainBed's own local launcher left it running, writing
    into the folder), and the same command then removes and reruns that job."""
    out = tmp_path / "eval"
    argv = [sys.executable, "-m", "domainbed_itl.scripts.evaluate_loss", "domainbed",
            "--dataset", "Debug28", "--data_dir", str(tmp_path), "--domainbed_root",
            str(patched_domainbed), "--losses", "CE", "--test_envs", "0", "--n_trials", "1",
            "--steps", "400", "--checkpoint_freq", "10", "--hparams", '{"batch_size": 8}',
            "--no_progress", "--output_dir", str(out)]
    command = subprocess.Popen(argv, env=domainbed_env(patched_domainbed), text=True,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
    deadline, started = time.monotonic() + 600, None
    while started is None:
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()
        started = next((p.parent for p in out.glob("*/results.jsonl") if p.stat().st_size), None)
        time.sleep(0.05)
    command.send_signal(signal.SIGTERM)
    stdout, stderr = command.communicate(timeout=120)
    assert command.returncode == 143 and "interrupted: run the same command again" in stderr
    assert not (started / "done").exists() and processes_naming(started) == []
    rerun = subprocess.run(argv, capture_output=True, text=True, env=domainbed_env(patched_domainbed),
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert f"1 job(s) of an earlier run did not finish (interrupted or failed); their folders are " \
           f"removed and they run again: {started.name}" in rerun.stdout
    assert (started / "done").exists()
    report = json.loads((out / "evaluation.json").read_text())
    assert not report["missing"] and len(report["records"]) == 1


@pytest.mark.domainbed
def test_domainbed_protocol_refuses_an_unpatched_checkout(domainbed_root, tmp_path, capsys,
                                                         isolated_imports):
    # isolated_imports: an earlier test may have imported a patched copy into this process.
    code = evaluate_loss.main(["domainbed", "--dataset", "Debug28", "--data_dir", str(tmp_path),
                               "--domainbed_root", str(domainbed_root), "--losses", "CE", "ITL",
                               "--test_envs", "0", "--output_dir", str(tmp_path / "o"),
                               "--steps", "2", "--hparams", '{"batch_size": 8}'])
    assert code == 2
    assert "lacks our patches" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_seeds_pair_losses_in_the_domainbed_plan(tmp_path):
    parser = evaluate_loss.build_parser()
    args = parser.parse_args(["domainbed", "--losses", "CE", "ITL", "--test_envs", "0", "5",
                              "--n_trials", "2", "--data_dir", str(tmp_path), "--output_dir",
                              str(tmp_path), "--steps", "100"])
    losses, _ = parse_losses(args.losses, args.reference, args.dataset)
    protocol = DomainBedProtocol(args.dataset, args.data_dir, tuple(args.test_envs), args.n_trials,
                                 args.steps)
    jobs = plan_jobs(protocol, losses, lambda *a: hash(a) % 1000)
    assert len(jobs) == 2 * 2 * 2
    seeds = {}
    for train_args, label, env, trial in jobs:
        seeds.setdefault((env, trial), set()).add(train_args["seed"])
        assert train_args["steps"] == 100 and train_args["hparams_seed"] == 0
        assert (train_args["algorithm"], label) in {("ERM", "CE"), ("ITL", "ITL")}
    assert all(len(s) == 1 for s in seeds.values()) and len(seeds) == 4


def _seed_hash(*args):
    return hash(args) % 1000


def test_test_envs_together_plan_one_job_per_loss_and_trial_holding_out_all(tmp_path):
    parser = evaluate_loss.build_parser()
    argv = ["domainbed", "--losses", "CE", "ITL", "--test_envs", "0", "5", "--n_trials", "3",
            "--data_dir", str(tmp_path), "--output_dir", str(tmp_path)]
    plans = {}
    for together in (False, True):
        args = parser.parse_args(argv + ["--test_envs_together"] * together)
        losses, _ = parse_losses(args.losses, args.reference, args.dataset)
        protocol = DomainBedProtocol(args.dataset, args.data_dir, tuple(args.test_envs), args.n_trials,
                                     together=args.test_envs_together)
        plans[together] = plan_jobs(protocol, losses, _seed_hash)
    assert len(plans[True]) == 2 * 3 and len(plans[False]) == 2 * 2 * 3
    for train_args, _, envs, trial in plans[True]:
        assert envs == (0, 5) and train_args["test_envs"] == [0, 5]
        assert train_args["seed"] == _seed_hash("evaluate_loss", "RotatedMNIST", 0, 5, trial)
    for train_args, _, envs, trial in plans[False]:  # each alone: the seeds of earlier evaluations
        assert train_args["test_envs"] == list(envs) and len(envs) == 1
        assert train_args["seed"] == _seed_hash("evaluate_loss", "RotatedMNIST", envs[0], trial)


def _checkpoint(step, out_acc, in_acc):
    return {"step": step, **{f"env{i}_out_acc": a for i, a in enumerate(out_acc)},
            **{f"env{i}_in_acc": a for i, a in enumerate(in_acc)}}


def test_training_domain_validation_counts_only_the_training_environments():
    checkpoints = [_checkpoint(0, [0.1, 0.5, 0.5, 0.9], [0.2, 0.3, 0.4, 0.5]),
                   _checkpoint(1, [0.9, 0.6, 0.6, 0.1], [0.6, 0.7, 0.8, 0.9]),
                   _checkpoint(2, [0.2, 0.6, 0.6, 0.2], [0.1, 0.1, 0.1, 0.1])]
    chosen, val = training_domain_validation(checkpoints, (0, 3))
    assert chosen["step"] == 1 and val == pytest.approx(0.6)  # ties: the first best
    chosen, val = training_domain_validation(checkpoints, (3,))
    assert chosen["step"] == 1 and val == pytest.approx((0.9 + 0.6 + 0.6) / 3)
    chosen, val = training_domain_validation(checkpoints, (0,))
    assert chosen["step"] == 0 and val == pytest.approx((0.5 + 0.5 + 0.9) / 3)


@pytest.mark.domainbed
def test_training_domain_validation_is_domainbeds_with_one_test_environment(domainbed_root,
                                                                             isolated_imports):
    from domainbed.lib.query import Q
    from domainbed.model_selection import IIDAccuracySelectionMethod

    generator = torch.Generator().manual_seed(0)
    for test_env in range(4):
        checkpoints = [{**_checkpoint(step, *torch.rand(2, 4, generator=generator).tolist()),
                        "args": {"test_envs": [test_env]}} for step in range(6)]
        chosen, val = training_domain_validation(checkpoints, (test_env,))
        theirs = IIDAccuracySelectionMethod.run_acc(Q(checkpoints))
        assert (chosen[f"env{test_env}_in_acc"], val) == pytest.approx(
            (theirs["test_acc"], theirs["val_acc"]))


@pytest.mark.domainbed
@pytest.mark.slow
def test_test_envs_together_runs_one_job_per_loss_and_reports_each_test_env(patched_domainbed, tmp_path):
    out = tmp_path / "eval"
    argv = [sys.executable, "-m", "domainbed_itl.scripts.evaluate_loss", "domainbed",
            "--dataset", "Debug28", "--data_dir", str(tmp_path), "--domainbed_root",
            str(patched_domainbed), "--losses", "CE", "ITL", "--test_envs", "0", "1",
            "--test_envs_together", "--n_trials", "1", "--steps", "3", "--checkpoint_freq", "1",
            "--hparams", '{"batch_size": 8}', "--output_dir", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, env=domainbed_env(patched_domainbed),
                         timeout=900)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "evaluation.json").read_text())
    assert not report["missing"] and report["settings"]["test_envs_together"] is True
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 2 and len(report["records"]) == 4
    for folder in folders:
        checkpoints = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        assert checkpoints[0]["args"]["test_envs"] == [0, 1]
        chosen, val = training_domain_validation(checkpoints, (0, 1))
        mine = [r for r in report["records"] if r["folder"] == folder.name]
        assert sorted(r["domain"] for r in mine) == ["env0", "env1"]
        for record in mine:
            assert record["test_acc"] == chosen[f"{record['domain']}_in_acc"]
            assert record["val_acc"] == pytest.approx(val) == chosen["env2_out_acc"]
