"""Issue 24's pieces wired into the search: --objective, records that carry accuracy and held-out
CE beside M, projection into a family's range, the aggregator's report and fallback, whole
hypergradients of small families, networks stopped at the cap, --label_noise, and run folders
written before all this still resuming."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from domainbed_itl.files.runfolder import read_metrics
from domainbed_itl.losses.lossfile import LossSpec, save_loss
from domainbed_itl.meta.config import MetaConfig, preset_config
from domainbed_itl.meta.data import synthetic_dataset
from domainbed_itl.meta.trainer import MetaTrainer
from domainbed_itl.scripts import cma_search, meta_train
from domainbed_itl.scripts._cli import load_data

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "synthetic", "--per_domain_cap", "12", "--inner_steps", "2", "--hidden", "4",
        "--batch_size", "8", "--no_progress"]
META = [*TINY, "--hvp_batch", "16"]
OLD_RUNS = Path(__file__).resolve().parents[1] / "data" / "runs_before_objectives"
TIMES = ("time_inner_s", "time_hypergradient_s", "time_eval_s", "time_diagnostics_s", "time_step_s")


def _lines(folder: Path):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _untimed(record):
    return {k: v for k, v in record.items() if k not in TIMES}


def _label_smoothing(tmp_path: Path, epsilon: float) -> str:
    path = tmp_path / f"ls{epsilon}.json"
    save_loss(path, LossSpec("label_smoothing", None, [epsilon]))
    return str(path)


def test_the_objective_is_a_setting_checked_against_the_registry():
    assert MetaConfig().objective == "heldout_ce"
    for preset in ("paper", "paper_guarded", "stationary"):
        assert preset_config(preset).objective == "heldout_ce"
    assert MetaConfig(objective="soft_error").outer.objective == "soft_error"
    with pytest.raises(ValueError, match="unknown objective 'accuracy'; expected one of "
                                         "calibrated_ce, heldout_ce, soft_error"):
        MetaConfig(objective="accuracy")


def test_an_unknown_objective_on_the_command_line_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        meta_train.main([*META, "--objective", "accuracy", "--output_dir", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "unknown objective 'accuracy'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibrated_ce_runs_end_to_end_and_resumes_as_the_uninterrupted_run(tmp_path):
    args = [*META, "--objective", "calibrated_ce"]
    assert meta_train.main([*args, "--outer_steps", "2", "--output_dir", str(tmp_path / "full")]) == 0
    assert meta_train.main([*args, "--outer_steps", "1", "--output_dir", str(tmp_path / "cut")]) == 0
    assert meta_train.main([*META, "--resume", "--outer_steps", "2",
                            "--output_dir", str(tmp_path / "cut")]) == 0
    full, cut = _lines(tmp_path / "full"), _lines(tmp_path / "cut")
    assert [_untimed(r) for r in full] == [_untimed(r) for r in cut]
    for record in full:
        assert record["objective"] == "calibrated_ce"
        assert 0 <= record["outer_heldout_acc"] <= 1
        per_domain = record["per_domain"]
        # M is CE at the best temperature, T = 1 among those searched: never above CE.
        assert all(m <= ce + 1e-5 for m, ce in zip(per_domain["heldout_loss"], per_domain["heldout_ce"]))
        assert any(m < ce - 1e-4 for m, ce in zip(per_domain["heldout_loss"], per_domain["heldout_ce"]))
        assert record["outer_heldout_ce"] == pytest.approx(sum(per_domain["heldout_ce"]) / 6)
    assert full[1]["omega_evaluated"] == full[0]["omega"]  # a record's M belongs to omega_evaluated
    read = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert read[0]["objective"] == "calibrated_ce" and "outer_heldout_ce" in read[0]
    loss = json.loads((tmp_path / "full" / "loss.json").read_text())
    assert loss["provenance"]["meta_config"]["outer"]["objective"] == "calibrated_ce"


def test_a_resume_with_another_objective_is_refused(tmp_path, capsys):
    assert meta_train.main([*META, "--outer_steps", "1", "--output_dir", str(tmp_path / "r")]) == 0
    assert meta_train.main([*META, "--resume", "--outer_steps", "2", "--objective", "soft_error",
                            "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--objective soft_error contradicts the checkpoint's objective heldout_ce" in err


def test_the_heldout_ce_record_is_the_paper_m():
    data = synthetic_dataset(per_domain=30, seed=1)
    config = MetaConfig(inner_steps=3, hidden=(4,), hvp_batch=16, batch_size=8, eval_size=None)
    record = MetaTrainer(data.domains, data.num_classes, config).outer_step()
    assert record["objective"] == "heldout_ce"
    assert record["per_domain"]["heldout_loss"] == record["per_domain"]["heldout_ce"]
    assert "hypergradient" in record["per_domain"]  # 12 parameters: recorded whole
    assert len(record["per_domain"]["hypergradient"][0]) == 12


def test_cma_es_ranks_candidates_by_the_chosen_objective(tmp_path):
    args = [*TINY, "--generations", "1", "--popsize", "3", "--family", "poly", "--order", "2"]
    assert cma_search.main([*args, "--objective", "soft_error", "--output_dir", str(tmp_path / "c")]) == 0
    record = _lines(tmp_path / "c")[0]
    assert record["objective"] == "soft_error"
    fitness = [f for f in record["population"]["outer_heldout_loss"] if f is not None]
    assert record["outer_heldout_loss"] == min(fitness) and 0 <= min(fitness) <= 1
    assert record["outer_heldout_loss"] != pytest.approx(record["outer_heldout_ce"])


def test_a_label_smoothing_step_below_zero_is_projected_back_to_zero(tmp_path):
    init = _label_smoothing(tmp_path, 0.02)
    # Adam's first step moves ε by the learning rate, 1.0, against the hypergradient's sign.
    args = [*META, "--init", init, "--aggregate", "mean", "--outer_optimizer", "adam",
            "--outer_lr", "1.0", "--outer_steps", "2", "--output_dir", str(tmp_path / "ls")]
    assert meta_train.main(args) == 0
    first, second = _lines(tmp_path / "ls")
    assert first["omega_evaluated"] == pytest.approx([0.02])
    assert sum(h[0] for h in first["per_domain"]["hypergradient"]) > 0  # M falls as ε falls
    assert first["projected"] == ["epsilon"] and first["omega"] == [0.0]
    assert second["omega_evaluated"] == [0.0]


def test_pcgrad_on_one_parameter_with_conflicting_domains_falls_back_to_the_mean(tmp_path, capsys):
    init = _label_smoothing(tmp_path, 0.1)
    args = [*META, "--init", init, "--aggregate", "pcgrad", "--aggregate_reduction", "mean",
            "--outer_optimizer", "sgd", "--outer_lr", "0.001", "--outer_steps", "1",
            "--output_dir", str(tmp_path / "pc")]
    assert meta_train.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("note: PCGrad with 1 parameter and 6 domains") == 1
    (record,) = _lines(tmp_path / "pc")
    grads = [h[0] for h in record["per_domain"]["hypergradient"]]
    assert min(grads) < 0 < max(grads)  # the domains conflict: PCGrad removes every one
    assert "pcgrad removed the whole update" in record["aggregator_fallback"]
    mean = sum(grads) / len(grads)
    assert record["hypergradient_norm"] == pytest.approx(abs(mean), rel=1e-5)
    assert record["omega"][0] == pytest.approx(0.1 - 0.001 * mean, rel=1e-5)
    assert record["projected"] == []


def test_the_mean_aggregator_reports_that_it_removed_nothing():
    data = synthetic_dataset(per_domain=30, seed=1)
    config = MetaConfig(inner_steps=3, hidden=(4,), hvp_batch=16, batch_size=8, eval_size=None,
                        aggregate="mean")
    record = MetaTrainer(data.domains, data.num_classes, config).outer_step()
    assert record["aggregator_removed"] == pytest.approx(0.0, abs=1e-6)
    assert record["aggregator_norm_ratio"] == pytest.approx(1.0)
    assert record["aggregator_fallback"] is None


def test_networks_stopped_at_the_cap_are_counted_in_the_record_and_the_progress_line():
    from domainbed_itl.meta.runner import progress_fields

    data = synthetic_dataset(per_domain=30, seed=1)
    config = MetaConfig(inner_steps=4, hidden=(4,), hvp_batch=16, batch_size=8, eval_size=None,
                        inner_stop_ratio=1e-6, inner_stop_every=2)  # unreachable in 4 steps
    record = MetaTrainer(data.domains, data.num_classes, config).outer_step()
    assert record["inner_at_cap"] == 6 and record["per_domain"]["inner_at_cap"] == [True] * 6
    assert progress_fields(record)["at_cap"] == "6/6"
    loose = MetaTrainer(data.domains, data.num_classes, config.replace(inner_stop_ratio=0.999999))
    record = loose.outer_step()
    at_cap = [s > 0.999999 for s in record["per_domain"]["stationarity"]]
    assert record["per_domain"]["inner_at_cap"] == at_cap and record["inner_at_cap"] == sum(at_cap)
    assert 0 < sum(at_cap) < 6  # some met the rule at the first check, the others did not
    assert [u < 4 for u in record["per_domain"]["inner_steps_used"]] == [not c for c in at_cap]
    without = MetaTrainer(data.domains, data.num_classes, config.replace(inner_stop_ratio=None))
    record = without.outer_step()
    assert "inner_at_cap" not in record and "inner_at_cap" not in record["per_domain"]
    assert set(progress_fields(record)) == {"M", "heldout_acc", "source_acc"}


def test_label_noise_changes_only_the_source_training_labels():
    flags = {"dataset": "synthetic", "data_dir": None, "domainbed_root": None,
             "per_domain_cap": 40, "data_seed": 3}
    clean, noisy = load_data({**flags, "label_noise": 0.0}), load_data({**flags, "label_noise": 0.25})
    assert clean.heldout_labels is None
    for (x, y), (xn, yn), held in zip(clean.domains, noisy.domains, noisy.heldout_labels):
        assert torch.equal(x, xn) and torch.equal(held, y)
        assert int((yn != y).sum()) == 10  # exactly a quarter of 40, each to another class
    trainer = MetaTrainer(noisy.domains, noisy.num_classes, MetaConfig(inner_steps=2, hidden=(4,)),
                          heldout_labels=noisy.heldout_labels)
    assert torch.equal(trainer.y_heldout, torch.cat([y for _, y in clean.domains]))
    assert not torch.equal(trainer.y, trainer.y_heldout)


def test_label_noise_is_in_the_provenance_and_the_resume_check(tmp_path, capsys):
    out = tmp_path / "noisy"
    assert meta_train.main([*META, "--label_noise", "0.5", "--outer_steps", "1",
                            "--output_dir", str(out)]) == 0
    loss = json.loads((out / "loss.json").read_text())
    assert loss["provenance"]["data_flags"]["label_noise"] == 0.5
    assert loss["provenance"]["data"]["training_label_noise"] == 0.5
    assert meta_train.main([*META, "--resume", "--label_noise", "0.3", "--outer_steps", "2",
                            "--output_dir", str(out)]) == 2
    assert "--label_noise 0.3 contradicts the checkpoint's label_noise 0.5" in capsys.readouterr().err
    assert meta_train.main([*META, "--resume", "--outer_steps", "2", "--output_dir", str(out)]) == 0
    assert len(_lines(out)) == 2


def test_a_label_noise_rate_outside_zero_to_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        meta_train.main([*META, "--label_noise", "1.5", "--output_dir", str(tmp_path / "o")])
    assert "expected a number in [0, 1], got '1.5'" in capsys.readouterr().err


def test_a_meta_train_run_folder_written_before_objectives_resumes(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(OLD_RUNS / "run", folder)
    old = _lines(folder)
    assert "objective" not in old[0] and "outer_heldout_ce" not in old[0]
    assert meta_train.main([*META, "--resume", "--outer_steps", "2", "--output_dir", str(folder)]) == 0
    records = _lines(folder)
    assert len(records) == 2 and records[0] == old[0]  # the old record is kept as it was
    assert records[1]["objective"] == "heldout_ce"
    assert records[1]["outer_heldout_loss"] == pytest.approx(records[1]["outer_heldout_ce"])
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2]


def test_a_cma_search_folder_of_that_time_is_refused_in_one_line_for_its_pickle(tmp_path, capsys):
    """CMA-ES checkpoints of that time held pycma's strategy as a pickle, which no reader of the
    package unpickles (docs/files.md): the resume says so and names the way to start again."""
    folder = tmp_path / "cma"
    shutil.copytree(OLD_RUNS / "cma", folder)
    assert cma_search.main([*TINY, "--resume", "--generations", "2", "--output_dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert len(_lines(folder)) == 1


def test_evaluate_loss_meta_and_grid_search_take_label_noise(tmp_path):
    from domainbed_itl.scripts import evaluate_loss, grid_search

    common = ["--dataset", "synthetic", "--per_domain_cap", "40", "--seeds", "0", "--inner_steps",
              "5", "--hidden", "4", "--no_progress"]
    reports = {}
    for rate in ("0", "0.5"):
        out = tmp_path / f"eval{rate}"
        assert evaluate_loss.main(["meta", *common, "--losses", "CE", "--label_noise", rate,
                                   "--output_dir", str(out)]) == 0
        reports[rate] = json.loads((out / "evaluation.json").read_text())
    assert "label_noise" not in reports["0"]["settings"]
    assert reports["0.5"]["settings"]["label_noise"] == 0.5
    clean, noisy = ([r["final_train_loss"] for r in reports[k]["records"]] for k in ("0", "0.5"))
    assert clean != noisy  # the networks trained on other labels
    out = tmp_path / "grid"
    assert grid_search.main(["--grid", "label_smoothing=0.1", *common, "--label_noise", "0.5",
                             "--output_dir", str(out)]) == 0
    assert "label_noise" in (out / "grid.md").read_text()


def test_a_users_objective_reaches_meta_train_through_the_environment_variable(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "my_objective.py").write_text(
        "import torch.nn.functional as F\n"
        "from domainbed_itl.meta.objectives import Objective, register_objective\n"
        "register_objective(Objective('half_ce', lambda z, y: 0.5 * F.cross_entropy(z, y), "
        "'half of held-out CE'))\n")
    env = {**os.environ, "DOMAINBED_ITL_OBJECTIVES": "my_objective",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.meta_train", *META,
                             "--objective", "half_ce", "--outer_steps", "1", "--output_dir", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    (record,) = _lines(out)
    assert record["objective"] == "half_ce"
    assert record["outer_heldout_loss"] == pytest.approx(0.5 * record["outer_heldout_ce"], rel=1e-5)
