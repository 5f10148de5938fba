"""The `domainbed-itl` console command: one sub-command per command of domainbed_itl/scripts/.

`domainbed-itl meta-train ...` runs `python -m domainbed_itl.scripts.meta_train ...`. See
docs/testing.md.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import sys
from typing import Dict, Optional, Sequence

from . import __version__

PROGRAM = "domainbed-itl"
HELP = ("-h", "--help")


def commands() -> Dict[str, str]:
    """{sub-command: module}: every command of domainbed_itl/scripts/ (its modules not starting
    with '_'), named with dashes (`meta_train` is `meta-train`), in alphabetical order."""
    scripts = importlib.util.find_spec("domainbed_itl.scripts")
    names = sorted(info.name for info in pkgutil.iter_modules(scripts.submodule_search_locations)
                   if not info.name.startswith("_"))
    return {name.replace("_", "-"): name for name in names}


def summary(module: str) -> str:
    """The first line of the command `module`'s docstring, read without importing it."""
    spec = importlib.util.find_spec(f"domainbed_itl.scripts.{module}")
    with open(spec.origin, encoding="utf-8") as source:
        docstring = ast.get_docstring(ast.parse(source.read())) or ""
    return docstring.strip().splitlines()[0] if docstring.strip() else ""


def usage(program: str = PROGRAM) -> str:
    """The console command's help: its usage and one line per sub-command."""
    table = commands()
    width = max(map(len, table)) + 2
    return "\n".join([
        f"usage: {program} <command> [flags ...]", "",
        "ITL for DomainBed: learned Taylor-polynomial losses, meta-learned by implicit gradients,",
        "and single-source DG sweeps.", "", "commands:",
        *(f"  {name:<{width}}{summary(module)}" for name, module in table.items()), "",
        f"`{program} <command> --help` shows a command's flags; every command is also",
        "`python -m domainbed_itl.scripts.<command>`, its name with underscores."])


def main(argv: Optional[Sequence[str]] = None, program: str = PROGRAM) -> int:
    """Run the sub-command `argv[0]` (sys.argv's when None) with the rest of `argv`; returns its
    exit status (2 for a missing or unknown sub-command)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in HELP:
        print(usage(program))
        return 0
    if words and words[0] == "--version":
        print(f"{PROGRAM} {__version__}")
        return 0
    table = commands()
    name = words[0].replace("_", "-") if words else None
    if name not in table:
        print(usage(program), file=sys.stderr)
        given = f"unknown command {words[0]!r}" if words else "a command is required"
        print(f"{program}: error: {given}; expected one of {', '.join(table)}", file=sys.stderr)
        return 2
    from .scripts._cli import invoked_as

    module = importlib.import_module(f"domainbed_itl.scripts.{table[name]}")
    with invoked_as(f"{program} {name}"):
        return module.main(words[1:])


def console() -> None:
    """The entry point of the `domainbed-itl` console script."""
    sys.exit(main())
