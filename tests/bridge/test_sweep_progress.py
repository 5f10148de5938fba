"""The plan, time estimate and progress bar of DomainBed sweeps (bridge/sweep_estimate.py,
files/job_progress.py): the evaluation count against DomainBed's own checkpoint rule, the
estimate's arithmetic, a real timing of DomainBed's classes, and the bar over `done` markers."""

import io
import json
import time

import pytest

from domainbed_itl.bridge.sweep_estimate import (JobTiming, describe_estimate, describe_estimates,
                                                 n_evaluations, time_job)
from domainbed_itl.files.job_progress import JobProgress, done_in, done_under, logged_step, steps_done_in


@pytest.mark.parametrize("steps", [1, 2, 5, 99, 100, 101, 1000, 5001])
@pytest.mark.parametrize("checkpoint_freq", [1, 3, 100, 300])
def test_evaluations_follow_domainbeds_checkpoint_rule(steps, checkpoint_freq):
    # DomainBed's train evaluates where `(step % checkpoint_freq == 0) or (step == n_steps - 1)`.
    expected = sum(step % checkpoint_freq == 0 or step == steps - 1 for step in range(steps))
    assert n_evaluations(steps, checkpoint_freq) == expected


def test_the_estimate_is_jobs_times_load_steps_and_evaluations():
    timing = JobTiming("ERM", "RotatedMNIST", setup_s=10, step_s=2, evaluation_s=5, steps=100,
                       checkpoint_freq=50)
    assert timing.evaluations == 3 and timing.job_s == 10 + 100 * 2 + 3 * 5
    text = describe_estimate(timing, 4, ["--steps", "--test_envs"])
    assert "ERM on RotatedMNIST" in text and "2.00 s a training step" in text
    assert "a job of 100 steps and 3 evaluations takes about 4 min" in text
    assert "the 4 jobs about 15 min one after the other" in text
    assert text.endswith("To shrink the sweep: --steps, --test_envs.")
    long = JobTiming("ERM", "PACS", 60, 3.6, 600, 5000, 300)
    # 5000 steps, checkpoints every 300: 17 evaluations and the last step's, 28860 s a job.
    text = describe_estimate(long, 2, ["--steps"])
    assert "18 evaluations takes about 8.0 h, the 2 jobs about 16.0 h" in text


def test_time_job_times_domainbeds_classes(domainbed_root, tmp_path):
    """Debug28 (random images): the first job of a sweep of ITL, which the timing registers in
    an unpatched checkout; steps and checkpoint frequency are the job's, or the dataset's."""
    job = {"dataset": "Debug28", "algorithm": "ITL", "test_envs": [0], "data_dir": str(tmp_path),
           "hparams": '{"batch_size": 8}', "hparams_seed": 0, "trial_seed": 0, "seed": 0,
           "holdout_fraction": 0.2, "steps": 7, "checkpoint_freq": 3}
    timing = time_job(job, domainbed_root, n_steps=2)
    assert (timing.algorithm, timing.dataset, timing.steps, timing.evaluations) == ("ITL", "Debug28", 7, 3)
    assert min(timing.setup_s, timing.step_s, timing.evaluation_s) > 0
    defaults = time_job({**job, "steps": None, "checkpoint_freq": None}, domainbed_root, n_steps=1)
    from domainbed import datasets

    assert (defaults.steps, defaults.checkpoint_freq) == (datasets.Debug28.N_STEPS,
                                                          datasets.Debug28.CHECKPOINT_FREQ)


def _job_folders(tmp_path, n):
    folders = [tmp_path / f"{i:032x}" for i in range(n)]
    for folder in folders:
        folder.mkdir()
    (tmp_path / "submitit").mkdir()
    (tmp_path / "submitit" / "log.out").write_text("")  # not a job folder
    return folders


def test_done_counters_count_done_markers_of_job_folders(tmp_path):
    folders = _job_folders(tmp_path, 3)
    count, under = done_in(folders), done_under(tmp_path)
    assert count() == under() == 0
    (folders[1] / "done").write_text("done")
    assert count() == under() == 1
    assert done_in(folders[:1])() == 0 and done_under(tmp_path / "absent")() == 0


def test_the_bar_starts_at_the_jobs_done_and_follows_the_markers(tmp_path):
    folders = _job_folders(tmp_path, 4)
    (folders[0] / "done").write_text("done")
    out = io.StringIO()
    with JobProgress(done_in(folders), 4, desc="test jobs", interval=0.01, file=out) as progress:
        assert progress.bar.n == 1 and progress.bar.initial == 1
        for folder in folders[1:3]:
            (folder / "done").write_text("done")
        deadline = time.monotonic() + 30
        while progress.bar.n < 3 and time.monotonic() < deadline:  # the watcher thread's work
            time.sleep(0.01)
        assert progress.bar.n == 3
        (folders[3] / "done").write_text("done")
    assert progress.bar.n == 4  # counted on exit
    assert "test jobs: 100%" in out.getvalue() and "4/4" in out.getvalue()


def test_a_disabled_bar_shows_and_watches_nothing(tmp_path):
    with JobProgress(done_in(_job_folders(tmp_path, 2)), 2, disable=True) as progress:
        progress.poll()
    assert progress.bar is None


def test_several_timed_kinds_are_each_named_and_summed():
    itl = JobTiming("ITL", "RotatedMNIST", setup_s=10, step_s=2, evaluation_s=5, steps=100,
                    checkpoint_freq=50)
    erm = JobTiming("ERM", "RotatedMNIST", setup_s=10, step_s=1, evaluation_s=5, steps=100,
                    checkpoint_freq=50)
    text = describe_estimates([itl, erm], [3, 2], ["--steps"])
    assert text.startswith("estimate (no GPU; timed here on the first job of each algorithm and "
                           "dataset, in launch order): ITL on RotatedMNIST: 2.00 s a training step")
    assert "ERM on RotatedMNIST: 1.00 s a training step" in text and "(3 jobs)" in text
    # 3 x (10 + 200 + 15) + 2 x (10 + 100 + 15) = 925 s
    assert "The 5 jobs take about 15 min one after the other" in text
    assert describe_estimates([itl], [4], ["--steps"]) == describe_estimate(itl, 4, ["--steps"])


def _record(step):
    return json.dumps({"step": step, "args": {"steps": 300}, "env0_out_acc": 0.5}) + "\n"


def test_the_steps_logged_are_the_last_records_step(tmp_path):
    folder = tmp_path / ("a" * 32)
    folder.mkdir()
    assert logged_step(folder) == 0  # no results.jsonl yet
    (folder / "results.jsonl").write_text(_record(0))
    assert logged_step(folder) == 1  # DomainBed records step 0 after the first update
    (folder / "results.jsonl").write_text(_record(0) + _record(100) + '{"step": 2')  # being written
    assert logged_step(folder) == 101
    count = steps_done_in([folder, tmp_path / ("b" * 32)], [300, 300])
    assert count() == 101
    (folder / "done").write_text("done")
    assert count() == 300


def test_the_bar_counts_steps_and_shows_the_jobs_done(tmp_path):
    folders = _job_folders(tmp_path, 2)
    (folders[0] / "results.jsonl").write_text(_record(4))
    (folders[0] / "done").write_text("done")
    out = io.StringIO()
    with JobProgress(steps_done_in(folders, [5, 5]), 10, desc="test jobs", unit="step",
                     interval=0.01, file=out, jobs=(done_in(folders), 2)) as progress:
        assert progress.bar.n == 5
        (folders[1] / "results.jsonl").write_text(_record(2))
        deadline = time.monotonic() + 30
        while progress.bar.n < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert progress.bar.n == 8
        (folders[1] / "done").write_text("done")
    assert "10/10" in out.getvalue() and "2/2 jobs done" in out.getvalue()
    assert "step/s" in out.getvalue() or "s/step" in out.getvalue()
