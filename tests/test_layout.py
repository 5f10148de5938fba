"""The package's folders: every package is installed, and only the bridge and the scripts reach DomainBed.

The rule is a folder rule: a module outside `domainbed_itl/bridge/` and `domainbed_itl/scripts/`
imports neither DomainBed nor the bridge. The package's two public doors into the bridge are the
exceptions, by name: `domainbed_itl.register()` (in `__init__.py`) and `domainbed_itl.registry`,
the import path of the hooks in DomainBed checkouts patched by any release.
"""

import ast
import configparser

from conftest import REPO

PACKAGE = REPO / "domainbed_itl"
MAY_REACH_DOMAINBED = {"bridge", "scripts"}
PUBLIC_DOORS = {PACKAGE / "__init__.py", PACKAGE / "registry.py"}


def test_setup_cfg_lists_every_package_of_the_source_tree():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in PACKAGE.rglob("__init__.py")}
    assert listed == found | {"domainbed_itl.sweeps", "domainbed_itl.patches"}
    assert config["options"]["package_dir"].split() == [
        "domainbed_itl.sweeps", "=", "sweeps", "domainbed_itl.patches", "=", "patches"]


def _imported(path):
    """Every module `path` imports, as absolute dotted names (relative imports resolved), the
    names of `from x import y` included as x.y."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    package = parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def _reaches_domainbed(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "domainbed" or parts[:2] == ["domainbed_itl", "bridge"]


def _outside_bridge():
    for path in PACKAGE.rglob("*.py"):
        folder = path.relative_to(PACKAGE).parts[0]
        if folder not in MAY_REACH_DOMAINBED and path not in PUBLIC_DOORS:
            yield path


def test_only_bridge_and_scripts_reach_domainbed():
    offenders = [(str(path.relative_to(REPO)), name) for path in _outside_bridge()
                 for name in _imported(path) if _reaches_domainbed(name)]
    assert offenders == []
    assert [p for p in _outside_bridge() if "import_domainbed" in p.read_text()] == []


def test_the_rule_sees_relative_imports():
    """The import reader resolves `from ..bridge import x` as the bridge (guards the rule itself)."""
    names = set(_imported(PACKAGE / "meta" / "solvers.py"))
    assert "domainbed_itl.meta.hypergradient" not in names  # solvers imports only torch and typing
    assert "torch" in names
    trainer = set(_imported(PACKAGE / "meta" / "trainer.py"))
    assert "domainbed_itl.losses.families.get_family" in trainer


def test_the_public_doors_are_the_only_exceptions():
    for door in PUBLIC_DOORS:
        assert any(_reaches_domainbed(name) for name in _imported(door)), door


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_sixty_lines():
    """Small functions: every function of the package, from `def` to its last line, fits in
    MAX_FUNCTION_LINES lines (a long one is split into named steps)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
