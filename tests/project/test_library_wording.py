"""The library raises typed errors and speaks in plain words; only scripts/ word them as flags.

A message the library raises or logs names an option of the call through domainbed_itl.files.errors
(`OVERWRITE`, `option(...)`), which a Python caller reads as `overwrite=True` and a command as
`--overwrite` (scripts/_cli.py `one_line`). See docs/files.md.
"""

from __future__ import annotations

import ast
import re
from typing import Iterator, List, Set

import pytest

from conftest import REPO
from domainbed_itl.files.atomic import OutputExists, write_atomic
from domainbed_itl.files.errors import OVERWRITE, RESUME, option, options, spelled
from domainbed_itl.files.sweepfolder import NotAFolder, load_runs
from domainbed_itl.scripts._cli import one_line, option_flag

LIBRARY = ("files", "meta", "losses", "analysis", "single_source")
FLAG = re.compile(r"(?<![\w-])--[a-z]")
SPEAKERS = {"log", "print", "warn", "warning", "info", "error", "debug", "write", "note"}


def _speaks(call: ast.Call) -> bool:
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name in SPEAKERS


def _strings(node: ast.AST) -> Iterator[ast.Constant]:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub


def _messages(tree: ast.AST) -> Iterator[ast.Constant]:
    """The string literals (f-string parts among them) of what `tree` raises or logs, and of the
    names a function assigns and then raises or logs."""
    for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                                     ast.AsyncFunctionDef)))]:
        said: List[ast.AST] = [n.exc for n in ast.walk(scope) if isinstance(n, ast.Raise) and n.exc]
        said += [n for n in ast.walk(scope) if isinstance(n, ast.Call) and _speaks(n)]
        names: Set[str] = {n.id for s in said for n in ast.walk(s) if isinstance(n, ast.Name)}
        for node in said:
            yield from _strings(node)
        if scope is not tree:
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id in names for t in node.targets):
                    yield from _strings(node.value)


def flag_words(source: str) -> List[str]:
    """'line: text' of every raised or logged literal of `source` that words a --flag."""
    hits = {id(c): c for c in _messages(ast.parse(source)) if FLAG.search(c.value)}
    return [f"{c.lineno}: {c.value!r}" for c in sorted(hits.values(), key=lambda c: c.lineno)]


def test_the_check_sees_flags_in_raises_logs_and_the_messages_they_use():
    source = '''
def f(path, log):
    text = f"{path} exists; pass --overwrite"
    if path:
        raise ValueError(text)
    log(f"--resume: {path}")
    raise RunDirError("a " "b --grid " + str(path))
def g():
    help = "with --inner_optimizer momentum"
    raise ValueError("plain words; overwrite=True replaces it")
'''
    found = flag_words(source)
    assert len(found) == 3 and "--overwrite" in found[0] and "--resume" in found[1] \
        and "--grid" in found[2], found


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_words_no_flags_in_what_it_raises_or_logs(package):
    found = [f"{path.relative_to(REPO)}:{hit}"
             for path in sorted((REPO / "domainbed_itl" / package).rglob("*.py"))
             for hit in flag_words(path.read_text(encoding="utf-8"))]
    assert not found, "the library words flags (name options with domainbed_itl.files.errors):\n" \
        + "\n".join(found)


def test_an_error_names_its_options_as_keywords_and_a_command_as_flags(tmp_path):
    write_atomic(tmp_path / "a", "x")
    with pytest.raises(OutputExists) as refused:
        write_atomic(tmp_path / "a", "y")
    error = refused.value
    assert str(error) == f"{tmp_path / 'a'} exists; pass overwrite=True to replace it"
    assert error.remedy == ("overwrite",) and error.paths == [tmp_path / "a"]
    assert one_line(error) == f"{tmp_path / 'a'} exists; pass --overwrite to replace it"
    with pytest.raises(NotAFolder) as missing:
        load_runs(tmp_path / "nothing")
    assert str(missing.value) == f"the sweep folder {tmp_path / 'nothing'} is not a folder"
    assert one_line(missing.value) == f"--input_dir {tmp_path / 'nothing'} is not a folder"
    assert missing.value.path == tmp_path / "nothing"


def test_options_read_back_from_a_message():
    text = f"pass {RESUME} or {OVERWRITE}; {option('grid', 'grid entry')} 'x'"
    assert options(text) == ("resume", "overwrite", "grid")
    assert spelled(text) == "pass resume=True or overwrite=True; grid entry 'x'"
    assert spelled(text, option_flag) == "pass --resume or --overwrite; --grid 'x'"
