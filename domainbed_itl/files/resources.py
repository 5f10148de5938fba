"""The data shipped with the package: the paper's sweep definitions and the DomainBed patches.

See docs/files.md.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

SHIPPED = ("sweeps", "patches")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _is_source_checkout(root: Path) -> bool:
    setup_cfg = root / "setup.cfg"
    return setup_cfg.is_file() and "name = domainbed-itl" in setup_cfg.read_text(errors="replace")


def shipped(name: str) -> Traversable:
    """The shipped folder `name` ('sweeps' or 'patches'), as a Traversable (e.g. a Path)."""
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped folder {name!r}; expected one of {', '.join(SHIPPED)}")
    if _is_source_checkout(_SOURCE_ROOT) and (_SOURCE_ROOT / name).is_dir():
        return _SOURCE_ROOT / name
    try:
        return importlib.resources.files(f"domainbed_itl.{name}")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"this installation of domainbed-itl lacks its {name}/ folder (the data package "
            f"domainbed_itl.{name}); reinstall it with pip") from None
