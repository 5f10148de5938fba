"""CMA-ES loss search (Fig. 4): the search on known optima, resume, the run folder, the commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from domainbed_itl.analysis.search_curves import at_budget, inner_trainings, search_curve
from domainbed_itl.losses import load_loss
from domainbed_itl.meta.cmaes import CMAConfig, CMASearch, default_popsize, run_cma_search
from domainbed_itl.meta.data import synthetic_dataset, synthetic_domains
from domainbed_itl.files.runfolder import REQUIRED, RunDirError, read_metrics
from domainbed_itl.meta.config import InnerSettings, MetaConfig
from domainbed_itl.meta.trainer import MetaTrainer
from domainbed_itl.scripts import cma_search, meta_train, plot_search

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMUM = np.array([0.7, -1.3, 2.0, 0.0, 0.25])


def _sphere(omega, generation):
    return {"outer_heldout_loss": float(np.sum((np.asarray(omega) - OPTIMUM) ** 2)),
            "outer_heldout_acc": 0.0}


def _rosenbrock(omega, generation):
    x = np.asarray(omega)
    return {"outer_heldout_loss": float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))}


def test_config_rejects_bad_values():
    for kwargs, message in [(dict(generations=0), "generations must be a positive integer, got 0"),
                            (dict(popsize=1), "popsize must be an integer >= 2"),
                            (dict(sigma0=-1.0), "sigma0 must be a positive finite number, got -1.0"),
                            (dict(sigma0=math.inf), "sigma0 must be a positive finite number"),
                            (dict(seed=-2), "seed must be an integer >= 0, got -2")]:
        with pytest.raises(ValueError, match=message):
            CMAConfig(**kwargs)


def test_cmaes_finds_the_minimum_of_a_shifted_sphere():
    search = CMASearch([0.0] * 5, CMAConfig(sigma0=1.0, seed=3))
    assert search.popsize == default_popsize(5) == 8
    for _ in range(120):
        record = search.generation(_sphere)
    assert np.allclose(search.best["omega"], OPTIMUM, atol=1e-4)
    assert np.allclose(search.mean, OPTIMUM, atol=1e-4)
    assert record["best_outer_heldout_loss"] < 1e-8 and record["step"] == 120
    assert record["omega"] == search.best["omega"]


def test_cmaes_finds_the_rosenbrock_minimum():
    search = CMASearch([-1.0, 1.0, -1.0, 1.0], CMAConfig(sigma0=0.5, seed=0, popsize=12))
    for _ in range(400):
        search.generation(_rosenbrock)
    assert np.allclose(search.best["omega"], 1.0, atol=1e-3)


def test_failed_candidates_rank_last_and_are_reported():
    def objective(omega, generation):
        if omega[0] > 0.5:
            raise FloatingPointError("diverged")
        return _sphere(omega, generation)

    search = CMASearch([0.0] * 5, CMAConfig(sigma0=1.0, seed=1))
    failed = 0
    for _ in range(150):
        record = search.generation(objective)
        failed += len(record["population"]["failed"])
        assert record["candidate_omega"][0] <= 0.5
        assert None in record["population"]["outer_heldout_loss"] or not record["population"]["failed"]
    assert failed > 0
    # The constrained optimum: ω₀ at the boundary 0.5, the rest free.
    assert np.allclose(search.best["omega"], [0.5, *OPTIMUM[1:]], atol=1e-2)


def test_a_generation_where_every_candidate_fails_stops_the_search():
    def objective(omega, generation):
        raise FloatingPointError("diverged")

    with pytest.raises(FloatingPointError, match="generation 1: every candidate failed, e.g. diverged"):
        CMASearch([0.0] * 3, CMAConfig()).generation(objective)


def test_resumed_search_repeats_the_uninterrupted_one():
    config = CMAConfig(sigma0=0.8, seed=7)
    full = CMASearch([0.0] * 5, config)
    records = [full.generation(_sphere) for _ in range(12)]
    cut = CMASearch([0.0] * 5, config)
    for _ in range(5):
        cut.generation(_sphere)
    np.random.seed(12345)  # the search never reads numpy's global generator
    resumed = CMASearch([0.0] * 5, config)
    resumed.load_state_dict(cut.state_dict())
    rest = [resumed.generation(_sphere) for _ in range(7)]
    assert resumed.mean == full.mean and resumed.best == full.best
    for a, b in zip(records[5:], rest):
        assert {k: v for k, v in a.items() if k != "time_step_s"} == {
            k: v for k, v in b.items() if k != "time_step_s"}
    with pytest.raises(ValueError, match="no CMA-ES of dimension 4"):
        CMASearch([0.0] * 4, config).load_state_dict(cut.state_dict())


# ------------------------------------------------------------------- the meta-learning harness

TINY = dict(inner_steps=6, hidden=(8,), eval_size=None, batch_size=16, seed=2)


def _data():
    return synthetic_domains(3, 40, 12, 3, seed=0, noise=1.5, degrees_per_domain=20)


def _untimed(record):
    return {k: v for k, v in record.items() if not k.startswith("time_")}


def test_a_generation_scores_candidates_with_the_outer_steps_objective(tmp_path):
    data, meta = _data(), MetaConfig(**TINY)
    search = run_cma_search(data, CMAConfig(generations=2, popsize=4, sigma0=0.3), meta, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["inner_trainings"] for r in records] == [4 * 3, 8 * 3]
    trainer = MetaTrainer(data.domains, data.num_classes, meta)
    for record in records:
        again = trainer.heldout_objective(record["candidate_omega"], record["step"])
        assert again["outer_heldout_loss"] == pytest.approx(record["outer_heldout_loss"], rel=1e-6)
        assert record["outer_heldout_loss"] == min(record["population"]["outer_heldout_loss"])
        assert set(REQUIRED) <= set(record)
    loss = load_loss(tmp_path / "loss.json")
    assert loss.parameters == pytest.approx(search.best["omega"])
    assert loss.provenance["search"] == "cma-es" and loss.provenance["generations"] == 2


def test_run_folder_resumes_exactly_and_refuses_other_settings(tmp_path):
    data, meta = _data(), MetaConfig(**TINY)
    run_cma_search(data, CMAConfig(generations=3, popsize=4, sigma0=0.3), meta, tmp_path / "full")
    run_cma_search(data, CMAConfig(generations=1, popsize=4, sigma0=0.3), meta, tmp_path / "cut")
    with pytest.raises(RunDirError, match="is not empty"):
        run_cma_search(data, CMAConfig(generations=3, popsize=4, sigma0=0.3), meta, tmp_path / "cut")
    with pytest.raises(RunDirError, match="sigma0: 0.3 in the checkpoint, 0.5 now"):
        run_cma_search(data, CMAConfig(generations=3, popsize=4, sigma0=0.5), meta, tmp_path / "cut",
                       resume=True)
    with pytest.raises(RunDirError, match="inner_steps: 6 in the checkpoint, 7 now"):
        run_cma_search(data, CMAConfig(generations=3, popsize=4, sigma0=0.3),
                       MetaConfig(**{**TINY, "inner_steps": 7}), tmp_path / "cut", resume=True)
    run_cma_search(data, CMAConfig(generations=3, popsize=4, sigma0=0.3), meta, tmp_path / "cut",
                   resume=True)
    full, cut = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                 for name in ("full", "cut"))
    assert [_untimed(r) for r in full] == [_untimed(r) for r in cut]
    assert load_loss(tmp_path / "full" / "loss.json").parameters == load_loss(
        tmp_path / "cut" / "loss.json").parameters


def test_overwrite_keeps_the_previous_search_until_the_new_one_has_a_checkpoint(tmp_path):
    data, meta, out = _data(), MetaConfig(**TINY), tmp_path / "run"
    run_cma_search(data, CMAConfig(generations=2, popsize=3, sigma0=0.3), meta, out)
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "loss.json")}
    notes = []
    # Inner training with a learning rate of 1e30 diverges for every candidate: no checkpoint.
    with pytest.raises(FloatingPointError, match=r"the overwrite kept the previous run \(2 generations, "):
        run_cma_search(data, CMAConfig(generations=2, popsize=3), MetaConfig(**{**TINY, "inner_lr": 1e30}),
                       out, overwrite=True, log=notes.append)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert "moved the previous run" in notes[0]
    run_cma_search(data, CMAConfig(generations=1, popsize=3, sigma0=0.3), meta, out, overwrite=True,
                   log=notes.append)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert notes[-1].startswith(f"overwrite: replaced the previous run in {out} (2 generations")
    assert not any(p.name.endswith("replaced") for p in out.iterdir())


def test_a_second_writer_is_refused(locked_folder):
    from domainbed_itl.files.runlock import FolderLocked

    with pytest.raises(FolderLocked, match=str(locked_folder)):
        run_cma_search(_data(), CMAConfig(generations=1, popsize=3), MetaConfig(**TINY), locked_folder)


CLI_TINY = ["--dataset", "synthetic", "--per_domain_cap", "40", "--inner_steps", "6", "--hidden", "8",
            "--batch_size", "16", "--no_progress"]


def test_cli_writes_a_loss_file_and_metrics_with_meta_trains_keys(tmp_path, capsys):
    out = tmp_path / "cma"
    assert cma_search.main(CLI_TINY + ["--generations", "2", "--popsize", "3", "--sigma0", "0.2",
                                       "--output_dir", str(out)]) == 0
    assert "CMA-ES done: 2 generations of 3" in capsys.readouterr().out
    loss = load_loss(out / "loss.json")
    assert (loss.family, loss.order, loss.provenance["preset"]) == ("taylor", 4, meta_train.DEFAULT_PRESET)
    assert loss.provenance["meta_config"]["inner"]["inner_lr"] == 0.01  # the default preset's inner loop
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 2 and records[-1]["inner_trainings"] == 2 * 3 * 6
    assert cma_search.main(CLI_TINY + ["--generations", "3", "--popsize", "3", "--sigma0", "0.2",
                                       "--output_dir", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cma_search.main(CLI_TINY + ["--generations", "3", "--popsize", "3", "--sigma0", "0.2",
                                       "--output_dir", str(out), "--resume"]) == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 3


def test_cli_resume_takes_the_searchs_settings_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "cma"
    assert cma_search.main(CLI_TINY + ["--generations", "1", "--popsize", "3", "--sigma0", "0.2",
                                       "--output_dir", str(out)]) == 0
    capsys.readouterr()
    assert cma_search.main(["--output_dir", str(out), "--resume", "--sigma0", "0.3"]) == 2
    assert "--sigma0 0.3 contradicts the checkpoint's sigma0 0.2" in capsys.readouterr().err
    assert cma_search.main(["--output_dir", str(out), "--resume", "--inner_steps", "7"]) == 2
    assert "--inner_steps 7 contradicts the checkpoint's inner_steps 6" in capsys.readouterr().err
    assert cma_search.main(["--output_dir", str(out), "--resume", "--generations", "2",
                            "--no_progress"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[-1]["popsize"] == 3
    provenance = load_loss(out / "loss.json").provenance
    assert provenance["cma_config"]["sigma0"] == 0.2 and provenance["resumed"][0]["from_step"] == 1


@pytest.mark.parametrize("argv,message", [
    (["--popsize", "1"], "expected an integer >= 2, got '1'"),
    (["--sigma0", "0"], "expected a positive finite number, got '0'"),
    (["--family", "taylor"], "--family taylor needs --order"),
    (["--family", "focal"], "a focal loss has 1 parameter (gamma); CMA-ES searches at least 2"),
    (["--init", "nonsense.json"], "nonsense.json"),
])
def test_cli_rejects_bad_arguments_by_name(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cma_search.main(CLI_TINY + ["--output_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_takes_meta_trains_inner_loop_flags():
    # Every inner-loop setting of the search is one meta_train takes, under the same name.
    assert set(cma_search.CONFIG_FLAGS) <= set(meta_train.CONFIG_FLAGS)
    # ... among them every one of InnerSettings, so candidates can be scored at convergence.
    assert set(InnerSettings.__dataclass_fields__) <= set(cma_search.CONFIG_FLAGS)


def test_candidates_are_scored_at_convergence_with_the_stationary_settings(tmp_path):
    """heldout_objective trains to the stopping rule: a candidate's record says how many steps
    each network took (fewer than the cap where the rule stopped it) and the accuracy gap."""
    argv = CLI_TINY + ["--preset", "stationary", "--inner_steps", "150", "--inner_stop_ratio",
                       "0.4", "--inner_stop_every", "10", "--generations", "1", "--popsize", "2",
                       "--output_dir", str(tmp_path)]
    assert cma_search.main(argv) == 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    used = record["per_domain"]["inner_steps_used"]
    assert all(u <= 150 and u % 10 == 0 for u in used) and min(used) < 150
    assert record["source_heldout_gap"] == pytest.approx(
        record["inner_source_acc"] - record["outer_heldout_acc"], abs=1e-6)


# ------------------------------------------------------------------------------- Fig. 4 plot


def _ift_records(steps, domains=3, dt=2.0):
    return [{"step": s, "outer_heldout_loss": 1.0 / s, "outer_heldout_acc": 0.5 + 0.01 * s,
             "inner_source_acc": 0.9, "time_step_s": dt, "per_domain": {"heldout_acc": [0.5] * domains}}
            for s in range(1, steps + 1)]


def _cma_records(generations, popsize=4, domains=3, dt=5.0):
    return [{"step": g, "outer_heldout_loss": 2.0 / g, "outer_heldout_acc": 0.4 + 0.02 * g,
             "inner_source_acc": 0.8, "time_step_s": dt, "popsize": popsize,
             "inner_trainings": g * popsize * domains} for g in range(1, generations + 1)]


def test_search_curves_count_inner_trainings_and_time():
    ift = search_curve(_ift_records(5))
    assert ift["inner_trainings"] == [3, 6, 9, 12, 15]
    assert ift["wall_clock_s"] == [2.0, 4.0, 6.0, 8.0, 10.0]
    cma = search_curve(_cma_records(2))
    assert cma["inner_trainings"] == [12, 24] and cma["step"] == [1, 2]
    cut = at_budget({"IFT": ift, "CMA-ES": search_curve(_cma_records(1))})
    assert cut["budget"] == 12 and cut["curves"]["IFT"]["step"] == [1, 2, 3, 4]
    assert cut["curves"]["CMA-ES"]["step"] == [1]
    with pytest.raises(ValueError, match="neither its inner_trainings"):
        inner_trainings({"step": 1})
    with pytest.raises(ValueError, match="lacks time_step_s"):
        search_curve([{k: v for k, v in _ift_records(1)[0].items() if k != "time_step_s"}])
    with pytest.raises(ValueError, match="steps out of order: 1 after 2"):
        search_curve(_ift_records(2)[::-1])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_search_draws_both_runs_at_an_equal_budget(tmp_path, capsys):
    ift = _write(tmp_path / "ift.jsonl", _ift_records(20))
    cma = _write(tmp_path / "cma.jsonl", _cma_records(3))
    argv = ["--runs", f"IFT={ift}", f"CMA-ES={cma}", "--output_dir", str(tmp_path / "fig")]
    assert plot_search.main(argv) == 0
    numbers = json.loads((tmp_path / "fig" / "search_curves.json").read_text())
    assert numbers["budget_inner_trainings"] == 36
    assert numbers["curves"]["IFT"]["step"] == list(range(1, 13))
    assert numbers["summary"]["IFT"]["final_outer_heldout_loss"] == pytest.approx(1 / 12)
    assert numbers["summary"]["CMA-ES"]["wall_clock_s"] == 15.0
    assert (tmp_path / "fig" / "search_curves.png").stat().st_size > 10_000
    assert "IFT" in capsys.readouterr().out
    assert plot_search.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert plot_search.main(argv + ["--full", "--overwrite"]) == 0
    numbers = json.loads((tmp_path / "fig" / "search_curves.json").read_text())
    assert len(numbers["curves"]["IFT"]["step"]) == 20


@pytest.mark.parametrize("runs,message", [
    (["IFT"], "expected LABEL=METRICS"),
    (["A={ift}", "A={ift}"], "label 'A' given twice"),
    (["A={missing}"], "No such file"),
    (["A={bad}"], "lacks"),
])
def test_plot_search_rejects_bad_runs(tmp_path, capsys, runs, message):
    paths = {"ift": _write(tmp_path / "ift.jsonl", _ift_records(2)), "missing": tmp_path / "none.jsonl",
             "bad": _write(tmp_path / "bad.jsonl", [{"step": 1}])}
    argv = ["--runs", *[r.format(**paths) for r in runs], "--output_dir", str(tmp_path / "fig")]
    assert plot_search.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "fig").exists()


def test_plot_search_on_a_real_ift_run_and_a_real_cma_run(tmp_path):
    common = ["--dataset", "synthetic", "--per_domain_cap", "40", "--inner_steps", "6", "--hidden", "8",
              "--batch_size", "16", "--no_progress", "--seed", "1"]
    assert meta_train.main(common + ["--outer_steps", "6", "--hvp_batch", "16", "--outer_lr", "0.0001",
                                     "--output_dir", str(tmp_path / "ift")]) == 0
    assert cma_search.main(common + ["--generations", "2", "--popsize", "3",
                                     "--output_dir", str(tmp_path / "cma")]) == 0
    assert plot_search.main(["--runs", f"IFT={tmp_path / 'ift' / 'metrics.jsonl'}",
                             f"CMA-ES={tmp_path / 'cma' / 'metrics.jsonl'}",
                             "--output_dir", str(tmp_path / "fig")]) == 0
    numbers = json.loads((tmp_path / "fig" / "search_curves.json").read_text())
    # 6 synthetic domains: an IFT step and a CMA-ES candidate both train 6 networks.
    assert numbers["budget_inner_trainings"] == 36
    assert numbers["curves"]["IFT"]["inner_trainings"] == [6, 12, 18, 24, 30, 36]
    assert numbers["curves"]["CMA-ES"]["inner_trainings"] == [18, 36]
    # Generation 1 of CMA-ES and step 1 of IFT train with the same randomness: a candidate
    # equal to IFT's initial ω would score IFT's step-1 M.
    ift_first = read_metrics(tmp_path / "ift" / "metrics.jsonl")[0]
    data = synthetic_dataset(per_domain=40, seed=0)  # what --dataset synthetic loads
    meta = MetaConfig(**{**load_loss(tmp_path / "cma" / "loss.json").provenance["meta_config"]})
    trainer = MetaTrainer(data.domains, data.num_classes, meta)
    assert trainer.heldout_objective(trainer.omega, 1)["outer_heldout_loss"] == pytest.approx(
        ift_first["outer_heldout_loss"], rel=1e-5)
    assert torch.isfinite(torch.tensor(numbers["curves"]["CMA-ES"]["outer_heldout_loss"])).all()
