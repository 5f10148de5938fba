"""Where torch or torchvision cannot be imported (a torchvision wheel built for another torch),
every command says so in one line naming the package and the versions found. The failure is
real: a package of that name on PYTHONPATH that raises on import, as a mismatched build does."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

COMMANDS = ["quickstart", "plot_meta", "evaluate_loss", "grid_search", "meta_train"]


def _broken(tmp_path, name, error):
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text(f"raise {error}\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return env


TORCHVISION = ("torchvision", 'RuntimeError("operator torchvision::nms does not exist")')
TORCH = ("torch", 'OSError("libtorch_cpu.so: cannot open shared object file")')


@pytest.mark.parametrize("name, error, command", [(*TORCHVISION, c) for c in COMMANDS] +
                         [(*TORCH, "quickstart")])
def test_a_package_that_cannot_import_is_named_in_one_line(tmp_path, name, error, command):
    env = _broken(tmp_path, name, error)
    result = subprocess.run([sys.executable, "-m", f"domainbed_itl.scripts.{command}", "--help"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {name} cannot be imported (")
    assert error.split('"')[1] in lines[0]
    for package in ("torch", "torchvision"):
        assert f"{package} {importlib.metadata.version(package)}" in lines[0]


def test_as_a_library_the_same_line_is_an_import_error(tmp_path):
    env = _broken(tmp_path, "torchvision", 'ImportError("no module named torchvision._C")')
    result = subprocess.run([sys.executable, "-c", "import domainbed_itl.scripts"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "ImportError: torchvision cannot be imported (ImportError: no module named " \
           "torchvision._C); found torch" in result.stderr


def test_nothing_is_said_when_both_import():
    from domainbed_itl.scripts._requirements import import_problem

    assert import_problem() is None
