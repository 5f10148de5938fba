"""The package's folders: every package is installed, and the library parts stay free of DomainBed."""

import ast
import configparser

import pytest
from conftest import REPO

# Only the bridge (algorithms, hparams, registry), domainbed_env, the data adapter
# (meta/domainbed_data.py) and scripts/ may import DomainBed; these folders never do.
WITHOUT_DOMAINBED = ["losses", "meta", "single_source", "experiments", "analysis"]


def test_setup_cfg_lists_every_package_of_the_source_tree():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "domainbed_itl").rglob("__init__.py")}
    assert listed == found | {"domainbed_itl.sweeps", "domainbed_itl.patches"}
    assert config["options"]["package_dir"].split() == [
        "domainbed_itl.sweeps", "=", "sweeps", "domainbed_itl.patches", "=", "patches"]


@pytest.mark.parametrize("folder", WITHOUT_DOMAINBED)
def test_library_folders_never_import_domainbed(folder):
    for path in (REPO / "domainbed_itl" / folder).glob("*.py"):
        if path.name == "domainbed_data.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not (name == "domainbed" or name.startswith("domainbed.")), path
                assert "domainbed_env" not in name, path
