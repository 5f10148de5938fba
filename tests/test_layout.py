"""The package's folders: every package is installed, and the library parts stay free of DomainBed."""

import ast
import configparser

import pytest
from conftest import REPO

# Only the bridge (algorithms, hparams, registry), domainbed_env, the data adapters
# (meta/domainbed_data.py for training data, trained_models.py for DomainBed's run folders and
# model.pkl), patching and scripts/ may import DomainBed; these folders never do, not even
# through a bridge module.
WITHOUT_DOMAINBED = ["losses", "meta", "single_source", "experiments", "analysis"]
BRIDGE = {"algorithms", "hparams", "registry", "domainbed_env", "patching", "trained_models"}


def test_setup_cfg_lists_every_package_of_the_source_tree():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "domainbed_itl").rglob("__init__.py")}
    assert listed == found | {"domainbed_itl.sweeps", "domainbed_itl.patches"}
    assert config["options"]["package_dir"].split() == [
        "domainbed_itl.sweeps", "=", "sweeps", "domainbed_itl.patches", "=", "patches"]


def _imported(path):
    """Every module name `path` imports, the names of `from . import x` included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
            yield from (f"{node.module or ''}.{a.name}" for a in node.names)


def _reaches_domainbed(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "domainbed" or any(part in BRIDGE for part in parts)


@pytest.mark.parametrize("folder", WITHOUT_DOMAINBED)
def test_library_folders_never_import_domainbed(folder):
    for path in (REPO / "domainbed_itl" / folder).glob("*.py"):
        if path.name == "domainbed_data.py":
            continue
        for name in _imported(path):
            assert not _reaches_domainbed(name), (path, name)


def test_only_the_bridge_modules_import_domainbed():
    """A new top-level module stays DomainBed-free unless it is added to the bridge on purpose."""
    for path in (REPO / "domainbed_itl").glob("*.py"):
        if path.stem in BRIDGE:
            continue
        for name in _imported(path):
            assert name.split(".")[0] != "domainbed", (path, name)
            assert "domainbed_env" not in name.split("."), (path, name)
        assert "import_domainbed" not in path.read_text(), path
