"""A grid of loss-family members: the points of `--grid NAME=V1,V2,...` (scripts/grid_search).

See docs/losses.md.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

from ..files.errors import Worded, option
from .checks import LossCheckError, check_minimisable
from .families import LossFamily, get_family, split_spelling
from .lossfile import LossSpec

MAX_GRID_PARAMS = 2
GRID = option("grid", "grid entry")
USAGE = "NAME=V1,V2,... (a family of one parameter) or NAME.PARAM=V1,V2,..."


class GridError(Worded, ValueError):
    """A grid entry that cannot make grid points: `entry` is it, `problem` what is wrong; the
    message names the entry as the `grid` option (scripts/ spell it --grid)."""

    def __init__(self, entry: str, problem: str, shown: Optional[str] = None) -> None:
        super().__init__(f"{GRID} {repr(entry) if shown is None else shown}: {problem}",
                         entry=entry, problem=problem)


def _number(value: float) -> str:
    """`value` written as short as it reads back exactly (0.05, 1, -1)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def member_label(spelling: str, parameters: Sequence[float]) -> str:
    """The label of a grid member: 'label_smoothing:0.1', 'sce:0.1,1'."""
    return f"{spelling}:" + ",".join(_number(float(v)) for v in parameters)


def _values(entry: str, text: str) -> List[float]:
    values = []
    for word in text.split(","):
        try:
            values.append(float(word))
        except ValueError:
            raise GridError(entry, f"{word.strip()!r} is not a number; expected "
                            f"{USAGE}") from None
        if values[-1] in values[:-1]:
            raise GridError(entry, f"the value {word.strip()} is given twice")
    return values


def _family(entry: str, spelling: str) -> LossFamily:
    name, order = split_spelling(spelling)
    try:
        family = get_family(name, order)
    except ValueError as error:
        raise GridError(entry, f"{error}") from None
    if family.num_params > MAX_GRID_PARAMS:
        raise GridError(entry, f"a {family.describe()} has {family.num_params} "
                        f"parameters; a grid takes families of one or two (search the others "
                        "with meta_train or cma_search)")
    return family


def _parameter(entry: str, spelling: str, family: LossFamily, name: str) -> int:
    """The index of the parameter `name` ('' for a family of one parameter) in ω."""
    names = family.param_names()
    if not name and len(names) == 1:
        return 0
    if not name:
        raise GridError(entry, f"a {family.describe()} has {len(names)} parameters; "
                        "give each one's values as " + " ".join(f"{spelling}.{n}=..." for n in names))
    if name not in names:
        raise GridError(entry, f"a {family.describe()} has no parameter {name!r}; "
                        f"expected {', '.join(names)}")
    return names.index(name)


def _checked(entry: str, family: LossFamily, index: int, value: float, num_classes: int) -> None:
    """GridError naming `value` if it lies outside its parameter's interval (the family's check)."""
    omega = family.default_parameters(num_classes)
    omega[index] = value
    try:
        family.check(omega)
    except ValueError as error:
        raise GridError(entry, f"{error}") from None


def parse_grid(entries: Sequence[str], num_classes: int) -> Dict[str, Dict[str, LossSpec]]:
    """{family spelling: {member label: LossSpec}} of the --grid entries, in their order, for a
    problem with `num_classes` classes; GridError naming the first bad entry or value."""
    axes: Dict[str, Tuple[LossFamily, Dict[int, List[float]]]] = {}
    for entry in entries:
        key, sep, text = entry.partition("=")
        spelling, _, name = key.strip().partition(".")
        if not sep or not spelling or not text.strip():
            raise GridError(entry, f"expected {USAGE}")
        family, given = axes.setdefault(spelling, (_family(entry, spelling), {}))
        index = _parameter(entry, spelling, family, name)
        if index in given:
            raise GridError(entry, f"{spelling} {family.param_names()[index]} is given "
                            "twice; give all its values in one entry")
        given[index] = _values(entry, text)
        for value in given[index]:
            _checked(entry, family, index, value, num_classes)
    return {spelling: _members(spelling, family, given, num_classes)
            for spelling, (family, given) in axes.items()}


def _members(spelling: str, family: LossFamily, given: Dict[int, List[float]],
             num_classes: int) -> Dict[str, LossSpec]:
    """Every member of the product of the given values (defaults elsewhere), checked to train."""
    defaults = family.default_parameters(num_classes)
    axes = [given.get(i, [default]) for i, default in enumerate(defaults)]
    members = {}
    for omega in itertools.product(*axes):
        label = member_label(spelling, omega)
        spec = LossSpec(family.name, family.order, list(omega), {"grid": spelling})
        try:
            check_minimisable(spec.module(), num_classes, f"the grid member {label}")
        except LossCheckError as error:
            raise GridError(spelling, str(error), shown=spelling) from None
        members[label] = spec
    return members
