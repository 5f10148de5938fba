"""The rows and columns a table shows: the names asked for, checked against those in the results.

See docs/analyses.md.
"""

from __future__ import annotations

from typing import List, Optional, Sequence


def check_subset(kind: str, wanted: Optional[Sequence[str]], present: Sequence[str]) -> List[str]:
    """`wanted` (all of `present` when None), refusing names absent from `present`."""
    if wanted is None:
        return list(present)
    unknown = [w for w in wanted if w not in present]
    if unknown:
        raise ValueError(f"{kind} {', '.join(map(repr, unknown))} not in the results; they hold "
                         f"{', '.join(present) or 'none'}")
    return list(wanted)
