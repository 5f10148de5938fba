"""Non-editable installs: a built wheel, and `pip install .`, each into a fresh virtual environment,
run `patch`, `paper_sweep list`, the `domainbed-itl` console command and an ITL run in DomainBed
from the installed package data.

The venvs see the site-packages of the interpreter running the tests (torch and the rest are
not downloaded again) through a .pth file naming them: `venv --system-site-packages` would give
them the *base* interpreter's packages, which, when the tests run in a virtual environment, are
not the ones installed there. Only the plain folders are added, not their own .pth files, so an
editable install of this package there stays invisible. The package itself is installed into
them with --no-deps from a copy of the source tree, and the commands run with no PYTHONPATH and
outside the repository, so that only the installed copy can be imported. The DomainBed run uses
the real checkout with DOMAINBED_ROOT, else the stand-in of tests/domainbed_standin.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import DOMAINBED_ROOT, REPO, STANDIN

pytestmark = pytest.mark.slow

SOURCE = ("domainbed_itl", "sweeps", "patches", "setup.cfg", "pyproject.toml", "README.md")


def _run(args, cwd, env, timeout=600):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result.stdout


def _site_folders():
    """The site-packages folders of the interpreter running the tests, on its sys.path."""
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return [f for f in dict.fromkeys(folders) if f in sys.path and os.path.isdir(f)]


def make_venv(where: Path) -> str:
    """A fresh virtual environment at `where` that sees this interpreter's packages; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "running_interpreter.pth").write_text("\n".join(_site_folders()) + "\n")
    return str(python)


def test_a_test_venv_sees_this_interpreters_packages_and_not_this_package(tmp_path):
    """What the install tests rely on, also when the suite itself runs in a virtual environment."""
    python = make_venv(tmp_path / "venv")
    probe = ("import importlib.util, json, pytest, torch, sys; "
             "print(json.dumps([torch.__file__, pytest.__file__, sys.prefix, "
             "importlib.util.find_spec('domainbed_itl') is None]))")
    torch_file, pytest_file, prefix, unseen = json.loads(_run([python, "-c", probe], tmp_path, _clean_env()))
    import pytest as running_pytest
    import torch

    assert (torch_file, pytest_file) == (torch.__file__, running_pytest.__file__)
    assert Path(prefix) == tmp_path / "venv" and unseen
    assert sys.prefix == sys.base_prefix or sysconfig.get_paths()["purelib"] in _site_folders()


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DOMAINBED_ROOT")}
    return {**env, **extra}


def _source_copy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for name in SOURCE:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(origin, src / name)
    return src


_STANDIN_ITL_RUN = """
import json, torch
from domainbed import algorithms, hparams_registry
from domainbed_itl.losses import TaylorLoss
hparams = hparams_registry.default_hparams("ITL", "Debug28")
algorithm = algorithms.get_algorithm_class("ITL")((3, 28, 28), 2, 2, hparams)
x, y = torch.randn(16, 3, 28, 28), torch.randint(0, 2, (16,))
with torch.no_grad():
    expected = TaylorLoss()(algorithm.predict(x), y).item()
print(json.dumps({"hparams": hparams, "loss": algorithm.update([(x[:8], y[:8]), (x[8:], y[8:])])["loss"],
                  "expected": expected}))
"""


@pytest.mark.parametrize("how", ["wheel", "pip install ."])
def test_installed_package_runs_from_its_package_data(tmp_path, how):
    src = _source_copy(tmp_path)
    venv = tmp_path / "venv"
    python = make_venv(venv)
    env = _clean_env()
    install = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed",
               "--no-index", "--quiet"]
    if how == "wheel":
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "--quiet", "-w", str(tmp_path / "dist"), str(src)], tmp_path, env)
        (wheel,) = (tmp_path / "dist").glob("domainbed_itl-*.whl")
        _run([*install, str(wheel)], tmp_path, env)
    else:
        _run([*install, str(src)], tmp_path, env)
    shutil.rmtree(src)  # nothing may be read from the source tree any more

    where = _run([python, "-c", "import domainbed_itl; print(domainbed_itl.__file__)"], tmp_path, env)
    assert Path(where.strip()).is_relative_to(venv), where

    listed = _run([python, "-m", "domainbed_itl.scripts.paper_sweep", "list"], tmp_path, env)
    for definition in (REPO / "sweeps").glob("*.toml"):
        assert f"\n{definition.stem} " in listed, listed
    shown = _run([python, "-m", "domainbed_itl.scripts.paper_sweep", "show", "table2_multi_source"],
                 tmp_path, env)
    assert f"definition: {venv}" in shown, shown

    command = venv / ("Scripts" if os.name == "nt" else "bin") / "domainbed-itl"  # the entry point
    assert _run([str(command), "paper-sweep", "list"], tmp_path, env) == listed
    assert "\n  meta-train " in _run([str(command), "--help"], tmp_path, env)
    assert "usage: domainbed-itl patch " in _run([str(command), "patch", "--help"], tmp_path, env)

    checkout = tmp_path / "DomainBed"
    shutil.copytree(DOMAINBED_ROOT or STANDIN, checkout,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    patch = [python, "-m", "domainbed_itl.scripts.patch"]
    assert "applicable" in _run([*patch, "check", "--domainbed_root", str(checkout)], tmp_path, env)
    assert "applied 3 patch(es)" in _run([*patch, "apply", "--domainbed_root", str(checkout)], tmp_path, env)
    assert "DomainBed registers ITL" in _run([*patch, "check", "--import", "--domainbed_root", str(checkout)],
                                             tmp_path, env)

    in_checkout = _clean_env(PYTHONPATH=str(checkout))
    if DOMAINBED_ROOT is None:
        result = json.loads(_run([python, "-c", _STANDIN_ITL_RUN], tmp_path, in_checkout))
        assert result["hparams"]["itl_loss"] == "ITL"
        assert result["loss"] == pytest.approx(result["expected"], rel=1e-5)
        return
    out = tmp_path / "itl_run"
    _run([python, "-m", "domainbed.scripts.train", "--dataset", "Debug28", "--algorithm", "ITL",
          "--data_dir", str(tmp_path), "--output_dir", str(out), "--steps", "2", "--checkpoint_freq", "1",
          "--hparams", '{"batch_size": 8}', "--test_envs", "0", "--skip_model_save"], tmp_path, in_checkout)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert (out / "done").exists() and records[-1]["hparams"]["itl_loss"] == "ITL"
    assert records[-1]["loss"] < 0  # the Taylor loss, not cross-entropy, was minimised
