"""Locating the user's DomainBed checkout (DomainBed is not on PyPI, so it is never a dependency)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

HOW_TO_GET = (
    "DomainBed is not installed with this package. Clone "
    "https://github.com/facebookresearch/DomainBed and either pass its folder with "
    "--domainbed_root, or put that folder on PYTHONPATH so that `import domainbed` works.")


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


def import_domainbed(root: Optional[str | os.PathLike] = None, module: str = "domainbed") -> ModuleType:
    """Import `module` (e.g. 'domainbed.datasets') from the checkout `root`, or from sys.path."""
    if root is not None:
        path = str(check_domainbed_root(root))
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == "domainbed" or e.name.startswith("domainbed.")):
            raise DomainBedNotFound(f"cannot import {module}. {HOW_TO_GET}") from e
        raise
