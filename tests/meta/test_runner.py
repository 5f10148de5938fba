"""A meta-training run's folder (meta/runner.py): loss, metrics and checkpoint written, resumed
bit for bit, protected, and an --overwrite that keeps the previous run until it is replaced."""

from __future__ import annotations

import json
import os

import pytest
import torch

from domainbed_itl.losses import LossSpec, load_loss
from domainbed_itl.files import runfolder
from domainbed_itl.files.runfolder import RunDirError
from domainbed_itl.meta.runner import META_RUN, run_meta_training
from domainbed_itl.meta.config import MetaConfig
from domainbed_itl.meta.trainer import NonFiniteError

from conftest import meta_checkpoint as _checkpoint, \
    tiny_config as _config, tiny_data as _data, untimed as _untimed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

def test_checkpoints_written_before_a_setting_existed_resume_with_its_default(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=1), tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    flat = MetaConfig.from_dict(ckpt["config"]).flat()  # the layout before the settings tree
    ckpt["config"] = {k: v for k, v in flat.items() if k not in ("warm_start", "max_solver_residual")}
    torch.save(ckpt, path)
    assert run_meta_training(data, _config(outer_steps=2), tmp_path, resume=True,
                             progress=False).steps_done == 2
    with pytest.raises(RunDirError, match="warm_start: False in the checkpoint, True now"):
        run_meta_training(data, _config(outer_steps=3, warm_start=True), tmp_path, resume=True,
                          progress=False)



def test_run_writes_loss_metrics_and_checkpoint(tmp_path):
    data = _data()
    trainer = run_meta_training(data, _config(outer_steps=3, seed=5), tmp_path / "run",
                                progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("inner_source_acc", "outer_heldout_acc", "outer_heldout_loss", "omega",
                "time_inner_s", "time_hypergradient_s"):
        assert key in records[0]
    spec = load_loss(tmp_path / "run" / "loss.json")
    assert (spec.family, spec.order) == ("taylor", 4)
    assert spec.parameters == trainer.omega.tolist() == records[-1]["omega"]
    prov = spec.provenance
    assert (prov["meta_train_dataset"], prov["steps"], prov["seed"]) == ("synthetic", 3, 5)
    assert prov["package_version"]
    ckpt = _checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["trainer"]["steps_done"] == 3 and ckpt["metrics"] == records
    assert oct(os.stat(tmp_path / "run" / "checkpoint.pt").st_mode & 0o044) == oct(
        0o044 & ~_umask())
    assert not list((tmp_path / "run").glob(".*tmp"))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_reaches_exactly_the_uninterrupted_omega(tmp_path, optimizer):
    data = _data()
    full = run_meta_training(data, _config(outer_steps=4, outer_optimizer=optimizer),
                             tmp_path / "full", progress=False)
    run_meta_training(data, _config(outer_steps=2, outer_optimizer=optimizer), tmp_path / "cut",
                      progress=False)
    resumed = run_meta_training(data, _config(outer_steps=4, outer_optimizer=optimizer),
                                tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps_done == 4
    assert torch.equal(resumed.omega, full.omega)
    metrics = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "cut")]
    assert [_untimed(json.loads(a)) for a in metrics[0]] == [_untimed(json.loads(b)) for b in metrics[1]]
    assert load_loss(tmp_path / "cut" / "loss.json").parameters == full.omega.tolist()


def test_resume_repairs_views_written_after_the_checkpoint(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=2), tmp_path, progress=False)
    (tmp_path / "metrics.jsonl").write_text("garbage\n")
    (tmp_path / "loss.json").unlink()
    run_meta_training(data, _config(outer_steps=2), tmp_path, resume=True, progress=False)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert load_loss(tmp_path / "loss.json").provenance["steps"] == 2


def test_output_dir_is_protected(tmp_path):
    data = _data()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not empty.*notes.txt.*resume=True.*overwrite=True"):
        run_meta_training(data, _config(outer_steps=1), tmp_path, progress=False)
    with pytest.raises(RunDirError, match="cannot resume.*no checkpoint.pt"):
        run_meta_training(data, _config(outer_steps=1), tmp_path, resume=True, progress=False)
    with pytest.raises(RunDirError, match="exclude each other"):
        run_meta_training(data, _config(outer_steps=1), tmp_path, resume=True, overwrite=True,
                          progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    run_meta_training(data, _config(outer_steps=1), tmp_path, overwrite=True, progress=False)
    first = (tmp_path / "checkpoint.pt").read_bytes()
    run_meta_training(data, _config(outer_steps=1, seed=1), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() != first
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(RunDirError, match=f"{tmp_path / 'new'} holds no checkpoint.pt, so there is "
                       "no run to resume; leave out resume=True to start one there") as refused:
        run_meta_training(data, _config(outer_steps=1), tmp_path / "new", resume=True, progress=False)
    assert refused.value.remedy == ("resume",) and refused.value.path == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # the refusal made no folder


def test_resume_refuses_other_settings_or_data(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=1), tmp_path, progress=False)
    with pytest.raises(RunDirError, match="inner_lr: 0.01 in the checkpoint, 0.02 now"):
        run_meta_training(data, _config(outer_steps=2, inner_lr=0.02), tmp_path, resume=True,
                          progress=False)
    with pytest.raises(RunDirError, match="the data differ"):
        run_meta_training(_data(seed=1), _config(outer_steps=2), tmp_path, resume=True,
                          progress=False)
    spec = LossSpec("taylor", 4, [0.5] * 12)
    with pytest.raises(RunDirError, match="initial loss parameters differ"):
        run_meta_training(data, _config(outer_steps=2), tmp_path, init=spec, resume=True,
                          progress=False)


def test_non_finite_stop_keeps_the_last_good_checkpoint(tmp_path):
    data = _data()
    config = _config(outer_steps=3, outer_optimizer="adam", outer_lr=1e30)
    with pytest.raises(NonFiniteError, match=r"outer step 2: non-finite .*the last good checkpoint "
                                             r"\(.*checkpoint.pt, step 1\) is kept"):
        run_meta_training(data, config, tmp_path, progress=False)
    assert _checkpoint(tmp_path / "checkpoint.pt")["trainer"]["steps_done"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def _outputs(folder):
    return {name: (folder / name).read_bytes() for name in META_RUN.outputs}


def test_overwrite_keeps_the_previous_run_when_the_new_one_fails_first(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=2), tmp_path, progress=False)
    before, notes = _outputs(tmp_path), []
    with pytest.raises(NonFiniteError, match=r"outer step 1: .*no checkpoint had been written yet; "
                                             r"the overwrite kept the previous run \(2 outer steps, "
                                             r"checkpoint.pt, metrics.jsonl, loss.json\) in "):
        run_meta_training(data, _config(outer_steps=2, inner_lr=1e30), tmp_path, overwrite=True,
                          progress=False, log=notes.append)
    assert _outputs(tmp_path) == before
    assert not (tmp_path / runfolder.REPLACED).exists()
    assert len(notes) == 1 and "moved the previous run" in notes[0]


def test_overwrite_deletes_the_previous_run_once_the_first_checkpoint_exists(tmp_path):
    data = _data()
    run_meta_training(data, _config(outer_steps=2), tmp_path, progress=False)
    before, seen = _outputs(tmp_path), []

    def log(message):  # called right after the move aside, and after the first new checkpoint
        seen.append((message, sorted(p.name for p in tmp_path.iterdir() if p.name in META_RUN.outputs)))
        if len(seen) == 1:
            assert _outputs(tmp_path / runfolder.REPLACED) == before

    run_meta_training(data, _config(outer_steps=2, seed=1), tmp_path, overwrite=True,
                      progress=False, log=log)
    (moved, left), (replaced, written) = seen
    assert f"moved the previous run in {tmp_path} (2 outer steps, checkpoint.pt, metrics.jsonl, " \
           f"loss.json) aside" in moved and left == []
    assert replaced == (f"overwrite: replaced the previous run in {tmp_path} (2 outer steps, "
                        "checkpoint.pt, metrics.jsonl, loss.json)")
    assert written == sorted(META_RUN.outputs) and not (tmp_path / runfolder.REPLACED).exists()
    assert _outputs(tmp_path)["checkpoint.pt"] != before["checkpoint.pt"]


@pytest.mark.parametrize("new_checkpoint", [False, True])
def test_an_overwrite_killed_midway_is_finished_by_the_next_run(tmp_path, new_checkpoint):
    data = _data()
    run_meta_training(data, _config(outer_steps=1), tmp_path / "old", progress=False)
    run_meta_training(data, _config(outer_steps=1, seed=1), tmp_path / "new", progress=False)
    aside = tmp_path / "run" / runfolder.REPLACED  # as a killed --overwrite leaves it
    aside.mkdir(parents=True)
    for name in META_RUN.outputs:
        os.replace(tmp_path / "old" / name, aside / name)
    if new_checkpoint:
        os.replace(tmp_path / "new" / runfolder.CHECKPOINT, tmp_path / "run" / runfolder.CHECKPOINT)
    notes = []
    trainer = run_meta_training(data, _config(outer_steps=2, seed=int(new_checkpoint)),
                                tmp_path / "run", resume=True, progress=False, log=notes.append)
    assert trainer.steps_done == 2 and not aside.exists()
    assert ("deleted the run" if new_checkpoint else "moved the previous run back") in notes[0]
