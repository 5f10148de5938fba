"""The test suite mirrors the package: unit tests in a folder named after the package folder they
test, command tests in `commands/`, the project's own checks in `project/`; short files, unique
names, and every test file the docs name exists (docs/testing.md)."""

import re
from collections import defaultdict

from conftest import REPO

TESTS = REPO / "tests"
PACKAGE_FOLDERS = {p.parent.name for p in (REPO / "domainbed_itl").glob("*/__init__.py")}
SUITE_FOLDERS = {"commands", "project"}
NOT_TESTS = {"data", "domainbed_standin"}  # the report tests' data, the stand-in DomainBed
MAX_TEST_FILE_LINES = 550


def _test_files():
    return sorted(p for p in TESTS.rglob("test_*.py")
                  if not NOT_TESTS & set(p.relative_to(TESTS).parts))


def test_every_test_file_sits_in_a_package_folder_or_commands_or_project():
    allowed = PACKAGE_FOLDERS | SUITE_FOLDERS
    misplaced = [str(p.relative_to(REPO)) for p in _test_files()
                 if len(p.relative_to(TESTS).parts) != 2 or p.parent.name not in allowed]
    assert misplaced == []
    assert len(_test_files()) > 40


def test_the_test_folders_are_the_packages_and_commands_and_project():
    """A folder of tests per package folder that has tests, and none for a folder the package
    does not have (a renamed package folder takes its tests' folder along)."""
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name not in NOT_TESTS | {"__pycache__"}}
    assert folders <= PACKAGE_FOLDERS | SUITE_FOLDERS, folders - PACKAGE_FOLDERS - SUITE_FOLDERS
    assert SUITE_FOLDERS | {"meta", "losses", "bridge"} <= folders


def test_test_module_names_are_unique_and_no_folder_is_a_package():
    """pytest's default import mode imports each test file by its bare name, with its folder on
    sys.path: two files of one name, or an __init__.py, would break that (and `from conftest
    import` needs tests/ on sys.path, which tests/conftest.py puts there)."""
    where = defaultdict(list)
    for path in _test_files():
        where[path.name].append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}
    packages = [p for p in TESTS.rglob("__init__.py") if not NOT_TESTS & set(p.relative_to(TESTS).parts)]
    assert packages == []


def test_no_test_file_is_longer_than_550_lines():
    long = {p.relative_to(TESTS).as_posix(): n for p in _test_files()
            if (n := len(p.read_text().splitlines())) > MAX_TEST_FILE_LINES}
    assert long == {}


def _named_test_files():
    """(file, named path) for every `tests/.../test_*.py` the docs, the configuration or the
    package's source name."""
    sources = [REPO / "README.md", REPO / "setup.cfg", REPO / "pyproject.toml",
               *(REPO / "docs").rglob("*.md"), *(REPO / "domainbed_itl").rglob("*.py")]
    for source in sources:
        for named in re.findall(r"(?<![\w/])tests/[\w/]*test_\w+\.py", source.read_text()):
            yield source.relative_to(REPO), named


def test_every_test_file_the_docs_name_exists():
    named = list(_named_test_files())
    assert [(str(source), path) for source, path in named if not (REPO / path).is_file()] == []
    assert ("docs/testing.md" in {str(source) for source, _ in named})


def _table(section):
    """The first cells (backticks removed) of the table under `## section` of docs/testing.md."""
    text = (REPO / "docs" / "testing.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("|")][2:]
    return [row.split("|")[1].strip().strip("`") for row in rows]


def test_the_test_folders_table_lists_every_test_folder():
    listed = _table("Test folders")
    folders = {f"{p.parent.relative_to(REPO)}/" for p in _test_files()}
    assert set(listed) == folders and len(listed) == len(folders)
