"""Apply, check or revert domainbed-itl's hooks in a DomainBed checkout (see domainbed_itl.bridge.patching).

    python -m domainbed_itl.scripts.patch check  --domainbed_root /path/to/DomainBed [--import]
    python -m domainbed_itl.scripts.patch apply  --domainbed_root /path/to/DomainBed
    python -m domainbed_itl.scripts.patch revert --domainbed_root /path/to/DomainBed

See docs/domainbed.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..bridge.domainbed_env import check_domainbed_root
from ..bridge.patching import CONFLICT, apply, import_check, load_hooks, revert, status
from ._cli import CommandParser, command_main


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = CommandParser("patch", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check", "apply", "revert"])
    parser.add_argument("--domainbed_root", required=True, help="DomainBed checkout folder")
    parser.add_argument("--patches_dir", default=None, type=Path,
                        help="folder of *.patch files (default: those shipped with domainbed-itl)")
    parser.add_argument("--import", dest="import_check", action="store_true",
                        help="check: also import DomainBed from the checkout to test the hooks")
    return parser


def _run(args: argparse.Namespace) -> int:
    """Check, apply or revert the hooks; 1 when `check` finds a conflict or a failed import."""
    root = check_domainbed_root(args.domainbed_root)
    hooks = load_hooks(args.patches_dir)
    if args.command == "check":
        states = status(root, hooks)
        for hook, state in zip(hooks, states):
            print(f"{hook.name}: {state}")
        failed = any(s.kind == CONFLICT for s in states)
        if args.import_check:
            problem = import_check(root)
            print(f"import check: {problem or 'DomainBed registers ITL, its hparams and launchers'}")
            failed = failed or problem is not None
        return 1 if failed else 0
    done = (apply if args.command == "apply" else revert)(root, hooks)
    verb = "applied" if args.command == "apply" else "reverted"
    print(f"{verb} {len(done)} patch(es) in {root}" + (f": {', '.join(done)}" if done else
                                                       f" (all already {verb})"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status."""
    return command_main(argv, build_parser, _run)


if __name__ == "__main__":
    sys.exit(main())
