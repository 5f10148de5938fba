"""Apply, check or revert domainbed-itl's hook patches on a DomainBed checkout.

    python -m domainbed_itl.scripts.patch check  --domainbed_root /path/to/DomainBed
    python -m domainbed_itl.scripts.patch apply  --domainbed_root /path/to/DomainBed
    python -m domainbed_itl.scripts.patch revert --domainbed_root /path/to/DomainBed

The patches target upstream commit b93c22a. `git apply` is used, so the checkout need not be a
git repository. Applying twice, or reverting an unpatched checkout, changes nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..domainbed_env import DomainBedNotFound, check_domainbed_root

UPSTREAM_COMMIT = "b93c22a"
PATCHES_DIR = Path(__file__).resolve().parents[2] / "patches"


class PatchError(RuntimeError):
    """The checkout is not what the patches expect."""


def patch_files(patches_dir: Path = PATCHES_DIR) -> List[Path]:
    """The patch series, in order."""
    files = sorted(Path(patches_dir).glob("*.patch"))
    if not files:
        raise PatchError(f"no *.patch files in {patches_dir}; run from a source checkout of "
                         "domainbed-itl (pip install -e .) or pass --patches_dir")
    return files


def _git_apply(root: Path, patch: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "apply", *flags, str(patch)], cwd=root, capture_output=True,
                          text=True)


def status(root: Path, patches: Sequence[Path]) -> List[str]:
    """'applied', 'applicable' or 'conflict: <git's reason>' for each patch."""
    states = []
    for patch in patches:
        if _git_apply(root, patch, "--check", "--reverse").returncode == 0:
            states.append("applied")
            continue
        check = _git_apply(root, patch, "--check")
        states.append("applicable" if check.returncode == 0 else
                      "conflict: " + (check.stderr.strip().splitlines() or ["git apply failed"])[-1])
    return states


def apply(root: Path, patches: Sequence[Path]) -> List[str]:
    """Apply every patch not yet applied; refuse (changing nothing) if any conflicts."""
    states = status(root, patches)
    _refuse_conflicts(root, patches, states)
    done = []
    for patch, state in zip(patches, states):
        if state == "applicable":
            result = _git_apply(root, patch)
            if result.returncode != 0:
                raise PatchError(f"git apply {patch.name} failed in {root}: {result.stderr.strip()}")
            done.append(patch.name)
    return done


def revert(root: Path, patches: Sequence[Path]) -> List[str]:
    """Revert every applied patch, last first; refuse (changing nothing) if any conflicts."""
    states = status(root, patches)
    _refuse_conflicts(root, patches, states)
    done = []
    for patch, state in reversed(list(zip(patches, states))):
        if state == "applied":
            result = _git_apply(root, patch, "--reverse")
            if result.returncode != 0:
                raise PatchError(f"git apply --reverse {patch.name} failed in {root}: "
                                 f"{result.stderr.strip()}")
            done.append(patch.name)
    return done


def _refuse_conflicts(root: Path, patches: Sequence[Path], states: Sequence[str]) -> None:
    bad = [f"  {p.name}: {s}" for p, s in zip(patches, states) if s.startswith("conflict")]
    if bad:
        raise PatchError(
            f"{root} is not what the patches expect (they target DomainBed commit "
            f"{UPSTREAM_COMMIT}); nothing was changed:\n" + "\n".join(bad) +
            "\nCheck out that commit, or add the hook lines shown in the patches by hand.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (0 ok, 1 check found conflicts, 2 refused)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check", "apply", "revert"])
    parser.add_argument("--domainbed_root", required=True, help="DomainBed checkout folder")
    parser.add_argument("--patches_dir", default=str(PATCHES_DIR))
    args = parser.parse_args(argv)
    try:
        root = check_domainbed_root(args.domainbed_root)
        patches = patch_files(Path(args.patches_dir))
        if args.command == "check":
            states = status(root, patches)
            for patch, state in zip(patches, states):
                print(f"{patch.name}: {state}")
            return 1 if any(s.startswith("conflict") for s in states) else 0
        done = (apply if args.command == "apply" else revert)(root, patches)
        verb = "applied" if args.command == "apply" else "reverted"
        print(f"{verb} {len(done)} patch(es) in {root}" + (f": {', '.join(done)}" if done else
                                                           f" (all already {verb})"))
        return 0
    except (PatchError, DomainBedNotFound) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
