"""Locating the user's DomainBed checkout (DomainBed is not on PyPI, so it is never a dependency).

See docs/domainbed.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Mapping, Optional, Tuple

DOMAINBED_URL = "https://github.com/facebookresearch/DomainBed"
HOW_TO_GET = (
    "DomainBed is not installed with this package. Clone "
    "https://github.com/facebookresearch/DomainBed and either pass its folder with "
    "--domainbed_root, or put that folder on PYTHONPATH so that `import domainbed` works "
    "(`python -m domainbed_itl.scripts.quickstart` clones and patches it for you).")


# DomainBed's data loaders start its datasets' N_WORKERS (8) processes each, and torch warns about
# it at every loader on a machine with fewer cores; a job with this filter in PYTHONWARNINGS does
# not (the start of the message, as Python's -W option matches it).
QUIET_LOADERS = "ignore:This DataLoader will create"


class DomainBedNotFound(ImportError):
    """No importable DomainBed checkout."""


def check_domainbed_root(root: str | os.PathLike) -> Path:
    """The checkout folder `root`, validated: it must contain domainbed/algorithms.py."""
    path = Path(root).expanduser().resolve()
    if not (path / "domainbed" / "algorithms.py").is_file():
        raise DomainBedNotFound(
            f"{root} is not a DomainBed checkout: {path / 'domainbed' / 'algorithms.py'} does not "
            f"exist. {HOW_TO_GET}")
    return path


def find_domainbed_root(root: Optional[str | os.PathLike] = None) -> Path:
    """The checkout `root`, validated; without it, the checkout that `import domainbed` loads."""
    if root is not None:
        return check_domainbed_root(root)
    spec = importlib.util.find_spec("domainbed")
    if spec is None or not spec.submodule_search_locations:
        raise DomainBedNotFound(f"no DomainBed checkout given and `import domainbed` finds none. "
                                f"{HOW_TO_GET}")
    return check_domainbed_root(Path(list(spec.submodule_search_locations)[0]).parent)


def import_domainbed(root: Optional[str | os.PathLike] = None, module: str = "domainbed") -> ModuleType:
    """Import `module` (e.g. 'domainbed.datasets') from the checkout `root`, or from sys.path.

    `root` goes first on sys.path, so that it wins over any other checkout there. A process
    imports DomainBed once: when it was already imported from another checkout, that one is
    returned, with a warning naming both.
    """
    if root is not None:
        path = str(check_domainbed_root(root))
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
        loaded = sys.modules.get("domainbed")
        where = getattr(loaded, "__file__", None)
        if where is not None and Path(where).resolve().parents[1] != Path(path).resolve():
            warnings.warn(f"DomainBed is already imported from {Path(where).resolve().parents[1]} "
                          f"in this process; --domainbed_root {path} is not used for {module} "
                          f"(run in a new process to use it)", stacklevel=2)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == "domainbed" or e.name.startswith("domainbed.")):
            raise DomainBedNotFound(f"cannot import {module}. {HOW_TO_GET}") from e
        raise


def optional_domainbed(root: Optional[str | os.PathLike], *modules: str
                       ) -> Optional[Tuple[ModuleType, ...]]:
    """DomainBed's `modules` for a command where DomainBed is optional: None when no `root` is
    given and DomainBed is not importable; a given `root` must be a checkout."""
    try:
        return tuple(import_domainbed(root, module) for module in modules)
    except DomainBedNotFound:
        if root is not None:
            raise
        return None


def with_pythonpath(path: str | os.PathLike, environ: Optional[Mapping[str, str]] = None
                    ) -> Dict[str, str]:
    """A copy of `environ` (default: os.environ) with `path` first on PYTHONPATH, once."""
    env = dict(os.environ if environ is None else environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(path)]
    env["PYTHONPATH"] = os.pathsep.join([str(path), *parts])
    return env


def with_quiet_loaders(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """A copy of `environ` (default: os.environ) whose PYTHONWARNINGS also holds QUIET_LOADERS."""
    env = dict(os.environ if environ is None else environ)
    filters = [f for f in env.get("PYTHONWARNINGS", "").split(",") if f and f != QUIET_LOADERS]
    env["PYTHONWARNINGS"] = ",".join([*filters, QUIET_LOADERS])
    return env


def clone_domainbed(url: str, commit: str, dest: str | os.PathLike) -> Path:
    """Clone DomainBed from `url` (any URL or path git takes) into `dest`, at `commit`.

    The clone is made beside `dest` under a temporary name and renamed only once it is checked
    out, so a failed or interrupted clone leaves no `dest` behind. Raises DomainBedNotFound with
    git's reason, or when `dest` exists.
    """
    dest = Path(dest).expanduser().resolve()
    if dest.exists():
        raise DomainBedNotFound(f"{dest} exists already; not cloning over it")
    if shutil.which("git") is None:
        raise DomainBedNotFound(f"cloning DomainBed needs git, which is not on PATH. {HOW_TO_GET}")
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        for step, args in (("clone", ["clone", "--quiet", "--no-checkout", url, str(partial)]),
                           ("checkout", ["-C", str(partial), "checkout", "--quiet", "--detach", commit])):
            result = subprocess.run(["git", *args], capture_output=True, text=True)
            if result.returncode != 0:
                reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
                raise DomainBedNotFound(f"git {step} of DomainBed {commit} from {url} failed: {reason}")
        check_domainbed_root(partial)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def git_commit(root: str | os.PathLike) -> Optional[str]:
    """The commit checked out in `root` when it is a git work tree of its own, else None."""
    root = Path(root)
    if shutil.which("git") is None or not (root / ".git").exists():
        return None
    result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True)
    return result.stdout.strip() if result.returncode == 0 else None
