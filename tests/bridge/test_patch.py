"""The hook patches: check, apply and revert read the files they change, on a checkout that is a
git repository, one that is not, and one vendored inside another git work tree; later DomainBed
commits are patched, checkouts the hooks cannot fit are refused unchanged.

Each test runs on the DomainBed stand-in (tests/domainbed_standin, as in CI) and, with
DOMAINBED_ROOT, on a copy of the real checkout.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DOMAINBED_ROOT, STANDIN

from domainbed_itl.bridge.patching import (APPLICABLE, APPLIED, CONFLICT, UPSTREAM_COMMIT, PatchError, apply,
                                    import_check, load_hooks, parse_patch, revert, status)
from domainbed_itl.files.resources import shipped

TARGETS = ("domainbed/algorithms.py", "domainbed/hparams_registry.py", "domainbed/command_launchers.py")
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _copy(source: str, dest: Path) -> Path:
    if source == "domainbed" and DOMAINBED_ROOT is None:
        pytest.skip("needs a DomainBed checkout: set DOMAINBED_ROOT")
    origin = DOMAINBED_ROOT if source == "domainbed" else STANDIN
    shutil.copytree(origin, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    return dest


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _commit_all(repo: Path) -> None:
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "vendored")


def _snapshot(root: Path) -> dict:
    return {t: (root / t).read_bytes() for t in TARGETS}


def _cli(root: Path, command: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "domainbed_itl.scripts.patch", command,
                           "--domainbed_root", str(root), *extra], capture_output=True, text=True)


@pytest.fixture(params=["standin", "domainbed"])
def source(request):
    return request.param


@needs_git
@pytest.mark.parametrize("layout", ["plain", "git repository", "inside another git work tree"])
def test_apply_check_revert_change_the_files(source, layout, tmp_path):
    if layout == "inside another git work tree":
        project = tmp_path / "project"
        root = _copy(source, project / "vendor" / "DomainBed")
        (project / "README").write_text("a project that vendors DomainBed\n")
        _commit_all(project)
    else:
        root = _copy(source, tmp_path / "DomainBed")
        if layout == "git repository":
            _commit_all(root)
    original = _snapshot(root)
    assert _cli(root, "check").stdout.count(f": {APPLICABLE}") == 3

    applied = _cli(root, "apply")
    assert applied.returncode == 0 and "applied 3 patch(es)" in applied.stdout, applied.stderr
    patched = _snapshot(root)
    for target in TARGETS:  # the hook really is in every file, appended to the original
        assert patched[target].startswith(original[target]), target
        assert b"from domainbed_itl import registry" in patched[target][len(original[target]):]
    assert _cli(root, "check").stdout.count(f": {APPLIED}") == 3
    if layout != "plain":
        changed = _git(root, "status", "--porcelain", "--", ".").split()
        assert sum(line.endswith(t) for line in changed for t in TARGETS) == 3

    again = _cli(root, "apply")
    assert again.returncode == 0 and "all already applied" in again.stdout
    assert _snapshot(root) == patched

    reverted = _cli(root, "revert")
    assert reverted.returncode == 0 and "reverted 3 patch(es)" in reverted.stdout
    assert _snapshot(root) == original
    if layout != "plain":
        assert _git(root, "status", "--porcelain", "--", ".") == ""


def test_a_later_commit_with_an_algorithm_appended_is_patched(source, tmp_path):
    root = _copy(source, tmp_path / "DomainBed")
    algorithms = root / "domainbed" / "algorithms.py"
    appended = ("\n\nclass LaterERM(ERM):\n    \"\"\"An algorithm added upstream after "
                f"{UPSTREAM_COMMIT}.\"\"\"\n\n\nALGORITHMS.append('LaterERM')\n")
    algorithms.write_text(algorithms.read_text() + appended)
    before = algorithms.read_text()
    assert [s.kind for s in status(root)] == [APPLICABLE] * 3
    assert len(apply(root)) == 3
    text = algorithms.read_text()
    assert text.startswith(before) and text.index("class LaterERM") < text.index("domainbed_itl")
    assert import_check(root) is None  # DomainBed imports, and registers ITL beside LaterERM
    assert len(revert(root)) == 3 and algorithms.read_text() == before


@pytest.mark.parametrize("damage, reason", [
    (lambda t: t.replace("REGISTRY", "LAUNCHERS"), "does not define REGISTRY"),
    (lambda t: t + "\nfrom domainbed_itl import registry\nregistry.register_command_launchers(REGISTRY)\n",
     "holds a domainbed-itl hook that differs"),
    (lambda t: t + "\ndef broken(:\n", "is not valid Python"),
    (None, "domainbed/command_launchers.py does not exist"),
])
def test_checkouts_the_hooks_cannot_fit_are_refused_unchanged(source, tmp_path, damage, reason):
    root = _copy(source, tmp_path / "DomainBed")
    target = root / "domainbed" / "command_launchers.py"
    if damage is None:
        target.unlink()
    else:
        target.write_text(damage(target.read_text()))
    before = {p: p.read_bytes() for p in (root / "domainbed").glob("*.py")}
    states = status(root)
    assert [s.kind for s in states[:2]] == [APPLICABLE] * 2 and states[2].kind == CONFLICT
    assert reason in states[2].reason
    result = _cli(root, "apply")
    assert result.returncode == 2
    assert "nothing was changed" in result.stderr and reason in result.stderr and "0003" in result.stderr
    assert {p: p.read_bytes() for p in before} == before, "a refused apply changed files"
    checked = _cli(root, "check")
    assert checked.returncode == 1
    assert f"0003-Register-domainbed-itl-s-command-launchers-submitit.patch: {CONFLICT}" in checked.stdout


def test_a_repeated_hook_is_a_conflict_and_revert_refuses_it(tmp_path):
    root = _copy("standin", tmp_path / "DomainBed")
    apply(root)
    target = root / "domainbed" / "hparams_registry.py"
    hook = load_hooks()[1]
    target.write_text(target.read_text() + hook.block)
    assert status(root)[1] == status(root)[1].__class__(CONFLICT, f"{hook.target} holds the hook 2 "
                                                                 "times; remove the copies")
    with pytest.raises(PatchError, match="nothing was changed"):
        revert(root)


def test_import_check_sees_whether_the_hooks_work(source, tmp_path):
    root = _copy(source, tmp_path / "DomainBed")
    assert "not registered" in import_check(root)
    apply(root)
    assert import_check(root) is None
    result = _cli(root, "check", "--import")
    assert result.returncode == 0 and "import check: DomainBed registers ITL" in result.stdout


def test_the_hooks_are_the_patch_files_additions():
    hooks = load_hooks()
    assert [h.target for h in hooks] == list(TARGETS)
    for hook in hooks:
        assert hook.block.startswith("\ntry:  # domainbed-itl:") and hook.block.endswith("\n")
        compile(hook.block, hook.target, "exec")
    assert [h.name for h in hooks] == sorted(p.name for p in shipped("patches").iterdir())


@pytest.mark.parametrize("text, message", [
    ("--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n", "may only add lines"),
    ("+++ b/x.py\n@@ -1 +1,2 @@\n a\n+b\n+++ b/y.py\n", "exactly one file"),
    ("+++ b/x.py\n@@ -1 +1,2 @@\n a\n+b\n@@ -9 +9,2 @@\n a\n+b\n", "exactly one hunk"),
    ("+++ b/x.py\n@@ -1 +1 @@\n a\n", "adds no lines"),
])
def test_patch_files_outside_what_the_tool_handles_are_named(text, message):
    with pytest.raises(PatchError, match=message):
        parse_patch("bad.patch", text)


@needs_git
def test_git_apply_gives_the_same_files_on_the_upstream_commit(tmp_path):
    """On b93c22a the patch files are plain git patches, and git makes exactly our files."""
    ours = _copy("domainbed", tmp_path / "ours")
    theirs = _copy("domainbed", tmp_path / "theirs")
    apply(ours)
    patches = sorted(str(p) for p in shipped("patches").iterdir())
    subprocess.run(["git", "apply", *patches], cwd=theirs, check=True, capture_output=True)
    assert _snapshot(ours) == _snapshot(theirs)


def test_a_folder_that_is_no_checkout_is_named(tmp_path):
    result = _cli(tmp_path, "check")
    assert result.returncode == 2 and "is not a DomainBed checkout" in result.stderr


def test_the_hooks_import_path_survives_the_bridge_move(source, tmp_path):
    """Checkouts patched by earlier releases call `from domainbed_itl import registry`: that path
    stays a public interface after the bridge moved to domainbed_itl.bridge."""
    import domainbed_itl.bridge.registration as bridge_registry
    import domainbed_itl.registry as hooks_path

    for name in ("register_algorithms", "wrap_hparams", "register_command_launchers"):
        assert getattr(hooks_path, name) is getattr(bridge_registry, name)
    for hook in load_hooks():
        assert "from domainbed_itl import registry as _itl_registry" in hook.block
    root = _copy(source, tmp_path / "DomainBed")
    apply(root)
    assert import_check(root) is None
