"""The package's folders: every package is installed, and only the bridge and the scripts reach DomainBed.

The rule is a folder rule: a module outside `domainbed_itl/bridge/` and `domainbed_itl/scripts/`
imports neither DomainBed nor the bridge. The package's two public doors into the bridge are the
exceptions, by name: `domainbed_itl.register()` (in `__init__.py`) and `domainbed_itl.registry`,
the import path of the hooks in DomainBed checkouts patched by any release.
"""

import ast
import configparser
import graphlib
import shutil
import subprocess
from collections import defaultdict

import pytest
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


def _room(name: str):
    """The room of the package a dotted module name lies in: its sub-package or top-level module
    (`meta`, `datasets`, ...); None for the package's root and for names outside it."""
    parts = name.split(".")
    if parts[0] != "domainbed_itl" or len(parts) < 2:
        return None
    if (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").exists():
        return parts[1]
    return None  # a name the root defines (`__version__`, `register`)


def _room_imports():
    """{room: {room it imports: [the importing files]}}, read from the source. The root's own
    `__init__.py` (its public `register()`, which reaches into the bridge) is the one exception:
    every room may import the root, and the root imports no room at import time."""
    graph = defaultdict(lambda: defaultdict(list))
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        source = _room(".".join(path.relative_to(REPO).with_suffix("").parts))
        for name in _imported(path):
            target = _room(name)
            if target is not None and target != source:
                graph[source][target].append(str(path.relative_to(REPO)))
    return graph


def test_the_rooms_import_each_other_as_a_stack():
    """No room imports a room that imports it back, directly or round a loop: the rooms form
    floors, each importing only those below (the order is printed, bottom floor first)."""
    graph = _room_imports()
    sorter = graphlib.TopologicalSorter({room: set(targets) for room, targets in graph.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as error:
        loop = error.args[1]
        links = [f"{a} -> {b} ({', '.join(sorted(set(graph[a][b])))})" for a, b in zip(loop, loop[1:])]
        raise AssertionError("imports run back up: " + "; ".join(links)) from None
    floors = []
    while sorter.is_active():
        floor = sorted(sorter.get_ready())
        floors.append(floor)
        sorter.done(*floor)
    print("the package's floors, bottom first:", " | ".join(", ".join(f) for f in floors))
    assert {"files", "losses", "meta", "bridge", "scripts"} <= {r for f in floors for r in f}


def test_the_stack_check_sees_a_loop():
    """The room reader resolves relative imports into rooms, and a loop is an error (guards the
    check itself)."""
    assert _room("domainbed_itl.files.runfolder.RunFolder") == "files"
    assert _room("domainbed_itl.__version__") is None and _room("torch.nn") is None
    assert "files" in _room_imports()["losses"]
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"files": {"losses"}, "losses": {"files"}}).prepare()


def test_no_two_modules_share_a_name():
    """A module's name says its room: no file name (but `__init__.py`) twice in the package."""
    where = defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            where[path.name].append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


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


# What the repository's root may hold: source, docs, data and configuration.
ROOT_ENTRIES = {
    "source": {"domainbed_itl", "tests", "bench"},
    "docs": {"README.md", "docs", "LICENSE"},
    "data": {"sweeps", "patches"},
    "config": {"setup.cfg", "pyproject.toml", ".gitignore", ".ci", ".github"},
}


def test_the_root_tracks_only_source_docs_data_and_config():
    """A stray log or scratch file committed at the root is refused (git ls-files)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout:
        pytest.skip(f"{REPO} is not a git checkout")
    top = {line.split("/", 1)[0] for line in listed.stdout.splitlines()}
    allowed = set().union(*ROOT_ENTRIES.values())
    assert sorted(top - allowed) == []
    assert {"domainbed_itl", "README.md", "setup.cfg"} <= top
