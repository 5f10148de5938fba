"""The analyses on models trained by DomainBed's own train script (Debug28 and real MNIST digits).

The runs are real: `python -m domainbed.scripts.train` of a patched DomainBed copy, with
--save_model_every_checkpoint, so the analyses read the very model.pkl / model_step<N>.pkl files
a user's sweep writes. Where DomainBed reports a number (accuracy per split and step in
results.jsonl), the analyses must reproduce it exactly from the checkpoints.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch.utils.data import ConcatDataset

from conftest import domainbed_env

from domainbed_itl.analysis.generalisation import accuracy_and_cross_entropy
from domainbed_itl.scripts import in_vs_cross, loss_landscape, target_entropy
from domainbed_itl.bridge.trained_models import find_runs, load_model, predict, rebuild_splits, subsample

# (algorithm, test envs, hparams seed): ERM and ITL on two training domains, single-source Mixup
# on one with random hparams (DomainBed stores some of those as numpy scalars in model.pkl).
RUNS = [("ERM", [0], 0), ("ITL", [0], 0), ("SingleSourceMixup", [1, 2], 1)]


def _start(root, out, algorithm, test_envs, dataset="Debug28", data_dir=".", steps=5, extra=()):
    """DomainBed's own train, started in a subprocess (with --save_model_every_checkpoint)."""
    return subprocess.Popen(
        [sys.executable, "-m", "domainbed.scripts.train", "--dataset", dataset, "--algorithm", algorithm,
         "--data_dir", str(data_dir), "--test_envs", *map(str, test_envs), "--steps", str(steps),
         "--checkpoint_freq", "2", "--save_model_every_checkpoint", "--output_dir", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=domainbed_env(root))


def _finish(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout[-2000:] + stderr[-3000:]


def _records(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def debug_runs(patched_domainbed, tmp_path_factory):
    """Three tiny DomainBed runs on Debug28 (16 random images per domain; batch size 8)."""
    base = tmp_path_factory.mktemp("analysis_runs")
    processes = [_start(patched_domainbed, base / algorithm, algorithm, test_envs,
                        extra=("--hparams_seed", str(seed), "--hparams", '{"batch_size": 8}'))
                 for algorithm, test_envs, seed in RUNS]
    for process in processes:
        _finish(process)
    return patched_domainbed, base


def test_checkpoints_are_found_in_step_order(debug_runs):
    _, base = debug_runs
    runs = {run.folder.name: run for run in find_runs([base])}
    assert sorted(runs) == sorted(a for a, _, _ in RUNS)
    for run in runs.values():
        assert [(c.path.name, c.step) for c in run.checkpoints] == [
            ("model_step0.pkl", 0), ("model_step2.pkl", 2), ("model_step4.pkl", 4), ("model.pkl", 4)]
        assert [c.step for c in run.steps] == [0, 2, 4]


def test_rebuilt_splits_reproduce_domainbeds_accuracies_at_every_checkpoint(debug_runs):
    root, base = debug_runs
    for algorithm, _, seed in RUNS:
        (run,) = find_runs([base / algorithm])
        records = {r["step"]: r for r in _records(run.folder)}
        if seed:  # random hparams: model.pkl holds numpy scalars, which plain weights_only refuses
            assert any("numpy" in name for name in
                       torch.serialization.get_unsafe_globals_in_checkpoint(run.final.path))
        for checkpoint in run.steps:
            model = load_model(checkpoint.path, root)
            assert model.name == algorithm and not model.algorithm.training
            assert model.args["hparams_seed"] == seed
            splits = rebuild_splits(model.args, model.hparams, domainbed_root=root)
            for env in range(3):
                for kind, split in (("in", splits.in_splits[env]), ("out", splits.out_splits[env])):
                    logits, labels = predict(model.algorithm, [split])
                    assert accuracy_and_cross_entropy(logits, labels)["accuracy"] == \
                        records[checkpoint.step][f"env{env}_{kind}_acc"], (algorithm, checkpoint, env, kind)


def _weighted(record, splits, envs, kind):
    sizes = [len((splits.in_splits if kind == "in" else splits.out_splits)[e]) for e in envs]
    return sum(record[f"env{e}_{kind}_acc"] * n for e, n in zip(envs, sizes)) / sum(sizes)


def test_in_vs_cross_on_domainbed_runs(debug_runs, tmp_path, capsys):
    root, base = debug_runs
    code = in_vs_cross.main([str(base), "--domainbed_root", str(root), "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "in_vs_cross.json").read_text())
    assert {r["label"] for r in data["runs"]} == {a for a, _, _ in RUNS}
    assert (tmp_path / "in_vs_cross.png").stat().st_size > 0
    assert len((tmp_path / "in_vs_cross.csv").read_text().splitlines()) == 1 + len(RUNS)
    for row in data["runs"]:
        (run,) = find_runs([row["run"]])
        model = load_model(run.final.path, root)
        splits = rebuild_splits(model.args, model.hparams, domainbed_root=root)
        last = _records(run.folder)[-1]
        assert row["train_accuracy"] == pytest.approx(_weighted(last, splits, splits.sources, "in"))
        assert row["in_test_accuracy"] == pytest.approx(_weighted(last, splits, splits.sources, "out"))
        assert row["cross_test_accuracy"] == pytest.approx(_weighted(last, splits, splits.test_envs, "in"))
        assert all(row[f"{s}_cross_entropy"] > 0 for s in ("train", "in_test", "cross_test"))
        assert data["summary"][row["label"]]["train_accuracy"]["n"] == 1
    assert "| SingleSourceMixup | 1 |" in out
    # An existing output is never replaced without --overwrite, and nothing is rewritten.
    before = (tmp_path / "in_vs_cross.json").read_bytes()
    code = in_vs_cross.main([str(base), "--domainbed_root", str(root), "--output_dir", str(tmp_path)])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "in_vs_cross.json").read_bytes() == before


def test_target_entropy_follows_the_checkpoints(debug_runs, tmp_path, capsys):
    root, base = debug_runs
    code = target_entropy.main([str(base), "--domainbed_root", str(root), "--output_dir", str(tmp_path),
                                "--algorithms", "ERM", "ITL"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "target_entropy.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["ERM", "ITL"]  # --algorithms dropped the third
    for run in data["runs"]:
        records = {r["step"]: r for r in _records(find_runs([run["run"]])[0].folder)}
        assert [p["step"] for p in run["checkpoints"]] == [0, 2, 4]
        for point in run["checkpoints"]:
            # Each checkpoint is the model of its step: its target accuracy is DomainBed's.
            assert point["accuracy"] == records[point["step"]]["env0_in_acc"]
            assert point["n_correct"] + point["n_incorrect"] == 13  # 16 - 3 held out
            for key in ("entropy_correct", "entropy_incorrect"):
                assert point[key] is None or 0 <= point[key] <= math.log(2) + 1e-9
    assert [p["step"] for p in data["curves"]["ITL"]] == [0, 2, 4]
    assert (tmp_path / "target_entropy.png").stat().st_size > 0


def test_loss_landscape_of_domainbed_models(debug_runs, tmp_path, capsys):
    root, base = debug_runs
    common = ["--domainbed_root", str(root), "--examples", "16", "--lanczos_steps", "2", "--points", "3",
              "--radius", "0.5"]
    code = loss_landscape.main([str(base / "ERM"), str(base / "ITL"), *common, "--output_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    models = json.loads((tmp_path / "loss_landscape.json").read_text())["models"]
    assert [m["label"] for m in models] == ["ERM", "ITL"]
    for m in models:
        assert m["t"] == [-0.5, 0.0, 0.5] and m["lanczos_steps"] == 2
        assert m["top_eigenvalue"] == pytest.approx(max(m["ritz_values"]))
        assert math.isfinite(m["residual"]) and m["source_examples"] == 16  # of two 13-image in-splits
        # At t = 0 the source loss is the model's cross-entropy on those training images, computed
        # here by DomainBed's predict instead of the flattened functional model.
        (run,) = find_runs([m["run"]])
        model = load_model(run.final.path, root)
        splits = rebuild_splits(model.args, model.hparams, domainbed_root=root)
        source = subsample(ConcatDataset([splits.in_splits[i] for i in splits.sources]), 16, seed=0)
        logits, labels = predict(model.algorithm, [source])
        expected = accuracy_and_cross_entropy(logits, labels)["cross_entropy"]
        assert m["source_loss"][1] == pytest.approx(expected, rel=1e-5)
        assert len(m["target_loss"]) == 3 and all(math.isfinite(v) for v in m["target_loss"])
    own = tmp_path / "own"
    code = loss_landscape.main([str(base / "ITL"), *common, "--loss", "own", "--output_dir", str(own)])
    assert code == 0, capsys.readouterr().err
    (itl,) = json.loads((own / "loss_landscape.json").read_text())["models"]
    assert itl["loss"] == "training loss of ITL" and itl["source_loss"][1] < 0  # ITL's loss is negative
    assert itl["source_loss"][1] != pytest.approx(models[1]["source_loss"][1])


def test_bad_inputs_exit_2_naming_them(debug_runs, tmp_path):
    root, base = debug_runs
    missing = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.in_vs_cross",
                              str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"),
                              "--domainbed_root", str(root)],
                             capture_output=True, text=True, timeout=300, env=domainbed_env(root))
    assert missing.returncode == 2 and f"{tmp_path / 'none'} does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    assert target_entropy.main([str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out"),
                                "--domainbed_root", str(root)]) == 2
    assert loss_landscape.main([str(base / "ERM"), "--radius", "0", "--output_dir", str(tmp_path / "o"),
                                "--domainbed_root", str(root)]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_accuracies_reproduced_on_real_digits(patched_domainbed, mnist10k, tmp_path):
    """ColoredMNIST from real MNIST digits: the rebuilt splits (shuffled and coloured by DomainBed
    with the run's seed) give DomainBed's accuracies exactly."""
    run_dir = tmp_path / "cmnist"
    _finish(_start(patched_domainbed, run_dir, "ITL", [2], dataset="ColoredMNIST", data_dir=mnist10k,
                   steps=1, extra=("--seed", "7", "--hparams", '{"batch_size": 16}')))
    (run,) = find_runs([run_dir])
    model = load_model(run.final.path, patched_domainbed)
    splits = rebuild_splits(model.args, model.hparams, domainbed_root=patched_domainbed)
    last = _records(run_dir)[-1]
    # A source domain's held-out split, and the test domain's in-split (what DomainBed reports).
    for split, key in ((splits.out_splits[0], "env0_out_acc"), (splits.in_splits[2], "env2_in_acc")):
        logits, labels = predict(model.algorithm, [split])
        assert accuracy_and_cross_entropy(logits, labels)["accuracy"] == last[key]
    # A different seed colours the digits differently: the check can fail.
    other = rebuild_splits({**model.args, "seed": 8}, model.hparams, domainbed_root=patched_domainbed)
    assert not torch.equal(other.out_splits[0][0][0], splits.out_splits[0][0][0])
