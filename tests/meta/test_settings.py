"""The settings tree (meta/settings.py, meta/config.py): each setting declared once, and the
flags, saved configs and resume checks read off it; old flat layouts still read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.func import grad, vjp

from conftest import REPO
from domainbed_itl.files.runfolder import RunDirError
from domainbed_itl.meta.config import InnerSettings, MetaConfig, SolverSettings, preset_config
from domainbed_itl.meta.data import synthetic_domains
from domainbed_itl.meta import aggregators
from domainbed_itl.meta.evaluate import Protocol
from domainbed_itl.meta.runner import run_meta_training
from domainbed_itl.meta.settings import SettingsError, leaf_names
from domainbed_itl.meta.trainer import MetaTrainer

TINY = dict(inner_steps=8, hidden=(8,), hvp_batch=32, eval_size=None, batch_size=16)


def test_a_config_reads_flat_nested_and_mixed_layouts_alike():
    config = preset_config("stationary", {"inner_steps": 7, "hidden": (4, 3)})
    assert MetaConfig.from_dict(config.flat()) == config == MetaConfig.from_dict(config.to_dict())
    assert config.to_dict()["inner"]["inner_steps"] == 7 and "inner_steps" not in config.to_dict()
    mixed = {**config.to_dict(), "outer_steps": 3}  # a part, then one of its settings over it
    assert MetaConfig.from_dict(mixed).outer_steps == 3
    assert config.inner_steps == config.inner.inner_steps == 7


def test_a_refused_setting_is_a_typed_error_naming_it():
    with pytest.raises(SettingsError, match="inner_lr must be a positive number") as info:
        MetaConfig(inner_lr=-1.0)
    assert info.value.setting == "inner_lr" and isinstance(info.value, ValueError)
    with pytest.raises(SettingsError, match="unknown setting") as info:
        MetaConfig.from_dict({"inner": {"inner_stepz": 3}})
    assert info.value.setting == "inner_stepz"


def test_the_protocol_is_built_from_the_same_inner_settings():
    protocol = Protocol(inner_steps=(30, 10), hidden=(8,), batch_size=16, eval_size=None)
    assert protocol.inner == InnerSettings(inner_steps=30, hidden=(8,), batch_size=16)
    assert protocol.to_dict()["inner_steps"] == (10, 30)
    assert set(protocol.to_dict()) == {*leaf_names(InnerSettings), "eval_size", "batched"}


def test_a_checkpoint_in_the_flat_layout_resumes_and_is_rewritten_nested(tmp_path):
    data = synthetic_domains(3, 40, 12, 3, seed=0)
    run_meta_training(data, MetaConfig(**TINY, outer_steps=1), tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"] = MetaConfig.from_dict(ckpt["config"]).flat()  # the layout before the tree
    torch.save(ckpt, path)
    run_meta_training(data, MetaConfig(**TINY, outer_steps=2), tmp_path, resume=True, progress=False)
    saved = torch.load(path, weights_only=True)["config"]
    assert saved["inner"]["inner_steps"] == 8 and saved["outer"]["outer_steps"] == 2
    with pytest.raises(RunDirError, match="inner_lr: 0.01 in the checkpoint, 0.5 now"):
        run_meta_training(data, MetaConfig(**TINY, outer_steps=3, inner_lr=0.5), tmp_path,
                          resume=True, progress=False)


def test_the_paper_scale_is_a_named_scale_on_the_outer_update():
    assert SolverSettings().hypergradient_scale == 1.0
    paper = preset_config("paper")
    assert paper.hypergradient.hypergradient_scale == 1 / paper.neumann_alpha


def test_a_paper_step_updates_omega_by_algorithm_2_as_printed():
    """The paper preset's update is the one of the series summed without α (Algorithm 2 as
    printed, computed here by its own loop), aggregated by PCGrad's sum: the 1/α now sits on
    the outer update, and the step is the same as when the solver returned the sum."""
    data = synthetic_domains(3, 40, 12, 3, seed=1)
    config = preset_config("paper", {**TINY, "outer_steps": 1})
    trainer = MetaTrainer(data.domains, data.num_classes, config)
    omega, captured = trainer.omega.clone(), {}
    original = trainer._hypergradients

    def spy(thetas, vs, draws, omega_):
        captured.update(thetas=thetas, vs=vs, draws=draws)
        return original(thetas, vs, draws, omega_)

    trainer._hypergradients = spy
    trainer.outer_step()
    thetas, vs, draws = captured["thetas"], captured["vs"], captured["draws"]
    printed = []
    for i in range(trainer.num_domains):
        x, y = trainer.x[draws.hvp[i]], trainer.y[draws.hvp[i]]

        def inner_grad(t, o, x=x, y=y):
            return grad(lambda u: trainer.family.loss(trainer.apply(u, x), y, o))(t)

        _, hvp = vjp(lambda t: inner_grad(t, omega), thetas[i])
        w = p = -vs[i]
        for _ in range(config.neumann_steps):  # v -= α H v; p += v, no α in front
            w = w - config.neumann_alpha * hvp(w)[0]
            p = p + w
        _, mixed = vjp(lambda o, theta=thetas[i]: inner_grad(theta, o), omega)
        printed.append(mixed(p)[0])
    h = aggregators.pcgrad(torch.stack(printed), draws.surgery, reduction="sum")
    torch.testing.assert_close(trainer.omega, omega - config.outer_lr * h, rtol=1e-4, atol=1e-7)


DUMMY = '''    inner_dummy: int = setting(3, "a setting added by a test", kind="int", low=0)

    def optimizer(self)'''


def _run(copy, *argv):
    env = {**os.environ, "PYTHONPATH": str(copy)}
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          cwd=copy, timeout=600)


@pytest.mark.usefixtures("one_thread")
def test_one_field_added_to_inner_settings_reaches_every_command_the_config_and_the_resume(tmp_path):
    """Adding an inner-training option is one field: it is then a flag of meta_train,
    evaluate_loss meta and grid_search, a setting of the saved config and of the resume check."""
    copy = tmp_path / "src"
    shutil.copytree(REPO / "domainbed_itl", copy / "domainbed_itl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / "domainbed_itl" / "meta" / "config.py"
    text = config.read_text()
    assert text.count("\n    def optimizer(self)") == 1
    config.write_text(text.replace("\n    def optimizer(self)", "\n" + DUMMY, 1))
    for command in (["meta_train"], ["evaluate_loss", "meta"], ["grid_search"]):
        shown = _run(copy, "-m", f"domainbed_itl.scripts.{command[0]}", *command[1:], "--help")
        assert shown.returncode == 0, shown.stderr
        assert "--inner_dummy INNER_DUMMY" in shown.stdout, command
    out = tmp_path / "run"
    argv = ["-m", "domainbed_itl.scripts.meta_train", "--dataset", "synthetic", "--per_domain_cap",
            "24", "--inner_steps", "4", "--hidden", "4", "--hvp_batch", "16", "--outer_steps", "1",
            "--no_progress", "--inner_dummy", "5", "--output_dir", str(out)]
    run = _run(copy, *argv)
    assert run.returncode == 0, run.stderr
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert saved["inner"]["inner_dummy"] == 5
    resumed = _run(copy, *[a if a != "5" else "6" for a in argv], "--resume")
    assert resumed.returncode == 2
    assert "--inner_dummy 6 contradicts the checkpoint's inner_dummy 5" in resumed.stderr
