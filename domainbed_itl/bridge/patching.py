"""domainbed-itl's hooks in a DomainBed checkout: check, apply and revert them by reading the files.

See docs/domainbed.md.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..files.atomic import write_atomic
from .domainbed_env import check_domainbed_root, with_pythonpath
from ..files.resources import Traversable, shipped

UPSTREAM_COMMIT = "b93c22a"
APPLIED, APPLICABLE, CONFLICT = "applied", "applicable", "conflict"

# The top-level names of each target module that its hook uses (the hooks read them through
# globals() or by name).
HOOK_NEEDS: Dict[str, Tuple[str, ...]] = {
    "domainbed/algorithms.py": ("ALGORITHMS", "ERM"),
    "domainbed/hparams_registry.py": ("_hparams",),
    "domainbed/command_launchers.py": ("REGISTRY",),
}
_OUR_IMPORT = re.compile(r"^\s*(from\s+domainbed_itl\b|import\s+domainbed_itl\b)", re.MULTILINE)


class PatchError(RuntimeError):
    """A patch file, or the checkout, is not what the patch tool can handle; nothing was changed
    unless the message says otherwise."""


@dataclass(frozen=True)
class Hook:
    """One patch of the series: the DomainBed file it changes and the block it appends."""

    name: str
    target: str
    block: str


@dataclass(frozen=True)
class State:
    """What a target file holds: APPLIED, APPLICABLE or CONFLICT, and why for a conflict."""

    kind: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}" if self.reason else self.kind


def parse_patch(name: str, text: str) -> Hook:
    """The hook of a patch file: a unified diff of one file whose single hunk only adds lines."""
    targets = re.findall(r"^\+\+\+ b/(\S+)$", text, flags=re.MULTILINE)
    if len(targets) != 1:
        raise PatchError(f"patch {name} must change exactly one file, it names {len(targets)}")
    body = text.split("\n@@ ", 1)
    if len(body) != 2 or "\n@@ " in body[1]:
        raise PatchError(f"patch {name} must hold exactly one hunk")
    added = []
    for line in body[1].split("\n")[1:]:
        if line == "-- ":  # git format-patch's signature
            break
        if line.startswith("+"):
            added.append(line[1:])
        elif line.startswith(("-", "\\")):
            raise PatchError(f"patch {name} removes or rewrites lines ({line!r}); a hook patch "
                             "may only add lines")
        elif line and not line.startswith(" "):
            raise PatchError(f"patch {name}: unexpected line in its hunk: {line!r}")
    if not added:
        raise PatchError(f"patch {name} adds no lines")
    return Hook(name, targets[0], "\n".join(added) + "\n")


def load_hooks(patches_dir: Optional[Traversable] = None) -> List[Hook]:
    """The patch series of `patches_dir` (default: the shipped `patches/`), in order."""
    folder = shipped("patches") if patches_dir is None else patches_dir
    if not folder.is_dir():
        raise PatchError(f"patches folder {folder} does not exist")
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".patch")), key=lambda p: p.name)
    if not files:
        raise PatchError(f"no *.patch files in {folder}")
    hooks = [parse_patch(p.name, p.read_text()) for p in files]
    targets = [h.target for h in hooks]
    if len(set(targets)) != len(targets):
        raise PatchError(f"two patches change the same file: {targets}")
    return hooks


def _top_level_names(tree: ast.Module) -> set:
    """Names bound by the module's top-level statements, also inside top-level if/try/with."""
    names: set = set()
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            pending += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            pending += [s for h in getattr(node, "handlers", []) for s in h.body]
    return names


def file_state(hook: Hook, text: Optional[str]) -> State:
    """The state of `hook` in a target file whose content is `text` (None: no such file)."""
    if text is None:
        return State(CONFLICT, f"{hook.target} does not exist")
    count = text.count(hook.block)
    if count == 1:
        return State(APPLIED)
    if count > 1:
        return State(CONFLICT, f"{hook.target} holds the hook {count} times; remove the copies")
    if _OUR_IMPORT.search(text):
        return State(CONFLICT, f"{hook.target} holds a domainbed-itl hook that differs from "
                               f"{hook.name} (an older version, or edited); remove the lines that "
                               "import domainbed_itl, then apply again")
    try:
        tree = ast.parse(text, filename=hook.target)
    except SyntaxError as error:
        return State(CONFLICT, f"{hook.target} is not valid Python (line {error.lineno}: {error.msg})")
    missing = [n for n in HOOK_NEEDS.get(hook.target, ()) if n not in _top_level_names(tree)]
    if missing:
        return State(CONFLICT, f"{hook.target} does not define {', '.join(missing)} at its top "
                               "level, which the hook uses")
    return State(APPLICABLE)


def _read(root: Path, hook: Hook) -> Optional[str]:
    path = root / hook.target
    return path.read_text() if path.is_file() else None


def status(root: str | os.PathLike, hooks: Optional[Sequence[Hook]] = None) -> List[State]:
    """The state of each patch in the checkout `root`, read from the files themselves."""
    root = check_domainbed_root(root)
    return [file_state(hook, _read(root, hook)) for hook in (hooks or load_hooks())]


def _write(root: Path, hook: Hook, text: str, expected: str) -> None:
    """Write `text` to the hook's file (atomically, keeping its mode) and read it back."""
    compile(text, hook.target, "exec")
    path = root / hook.target
    write_atomic(path, text, overwrite=True, mode=path.stat().st_mode & 0o7777)
    state = file_state(hook, _read(root, hook))
    if state.kind != expected:
        raise PatchError(f"wrote {path}, but reading it back finds the hook {state}, not {expected}")


def _without_conflicts(root: str | os.PathLike, hooks: Optional[Sequence[Hook]]
                       ) -> Tuple[Path, List[Hook], List[State]]:
    """The checkout, the hooks and their states; PatchError when any patch is in conflict."""
    root = check_domainbed_root(root)
    hooks = list(hooks or load_hooks())
    states = status(root, hooks)
    bad = [f"  {h.name}: {s}" for h, s in zip(hooks, states) if s.kind == CONFLICT]
    if bad:
        raise PatchError(
            f"{root} is not what the patches can handle (they were made against DomainBed "
            f"commit {UPSTREAM_COMMIT}); nothing was changed:\n" + "\n".join(bad))
    return root, hooks, states


def apply(root: str | os.PathLike, hooks: Optional[Sequence[Hook]] = None) -> List[str]:
    """Append every hook not yet present; the names of the patches applied now.

    Refuses, changing nothing, when any patch is in conflict.
    """
    root, hooks, states = _without_conflicts(root, hooks)
    done = []
    for hook, state in zip(hooks, states):
        if state.kind == APPLICABLE:
            text = _read(root, hook)
            _write(root, hook, text + ("" if text.endswith("\n") or not text else "\n") + hook.block,
                   APPLIED)
            done.append(hook.name)
    return done


def revert(root: str | os.PathLike, hooks: Optional[Sequence[Hook]] = None) -> List[str]:
    """Remove every hook present, last patch first; the names of the patches reverted now.

    Refuses, changing nothing, when any patch is in conflict.
    """
    root, hooks, states = _without_conflicts(root, hooks)
    done = []
    for hook, state in reversed(list(zip(hooks, states))):
        if state.kind == APPLIED:
            _write(root, hook, _read(root, hook).replace(hook.block, "", 1), APPLICABLE)
            done.append(hook.name)
    return done


_IMPORT_CHECK = """
import domainbed.algorithms as a, domainbed.hparams_registry as h, domainbed.command_launchers as c
from domainbed_itl.bridge.algorithms import LOSS_ALGORITHMS as ours
missing = [n for n in ours if n not in a.ALGORITHMS and ours[n].base in a.ALGORITHMS]
assert not missing, f"algorithms not registered: {missing}"
assert "itl_loss" in h.default_hparams("ITL", "RotatedMNIST"), "ITL's hparams are not registered"
assert "submitit" in c.REGISTRY, "the submitit launcher is not registered"
"""


def import_check(root: str | os.PathLike) -> Optional[str]:
    """Import the checkout's DomainBed in a fresh interpreter: None when the hooks registered our
    algorithms, hparams and launchers there, else what went wrong."""
    root = check_domainbed_root(root)
    result = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], cwd=root, capture_output=True,
                            text=True, env=with_pythonpath(root))
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
