"""Before any command runs: torch and torchvision import, or the command says which cannot, in
one line, with the versions installed. See docs/quickstart.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Optional

PACKAGES = ("torch", "torchvision")
FIX = ("install the torch and torchvision builds that belong together (see the README's "
       "installation section)")


def version(name: str) -> str:
    """The installed version of distribution `name`, or 'not installed'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def import_problem() -> Optional[str]:
    """None when every one of PACKAGES imports, else one line naming the first that does not,
    why, and the versions found."""
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except Exception as error:  # ImportError, or a mismatched build's RuntimeError/OSError
            why = " ".join(str(error).split()) or type(error).__name__
            found = ", ".join(f"{n} {version(n)}" for n in PACKAGES)
            return (f"{name} cannot be imported ({type(error).__name__}: {why[:200]}); found "
                    f"{found}: {FIX}")
    return None


def check_imports() -> None:
    """Exit with the one line (status 1) when a package cannot be imported by a command, raise
    ImportError with it when imported as a library; nothing when all import."""
    problem = import_problem()
    if problem is None:
        return
    if sys.argv and (sys.argv[0] == "-m" or "domainbed-itl" in sys.argv[0]):
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(1)
    raise ImportError(problem)
