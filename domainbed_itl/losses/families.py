"""Loss families, parametric losses whose parameters ω can be meta-learned (Sec. 3.4, Table 1's
iSCE), in a registry that users extend with their own.

See docs/losses.md.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .taylor import _check_target, _reduce

PLUGINS_ENV = "DOMAINBED_ITL_FAMILIES"
PerSampleLoss = Callable[[Tensor, Tensor, Tensor], Tensor]
_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?<![0-9])")
PROJECTION_MARGIN = 1e-6  # how far inside an open end `project` puts a value


class ParameterRangeError(ValueError):
    """Loss parameters that are not finite or lie outside their family's intervals."""


def _endpoint(text: str) -> float:
    return float(text) if text.lstrip("+-") == "inf" else float(Fraction(text))


@dataclass(frozen=True)
class Parameter:
    """One entry of ω: its name, its default (a number, or a function of the number of classes),
    the interval its values must lie in, written as in mathematics ('[0, 1)', '(0, 1]',
    '[-1/2, inf)'), and what it means."""

    name: str
    default: float | Callable[[int], float]
    interval: str = "(-inf, inf)"
    doc: str = ""
    _bounds: Tuple[float, float, bool, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        match = _INTERVAL.fullmatch(self.interval.strip())
        try:
            low, high = _endpoint(match[2]), _endpoint(match[3])
        except (TypeError, ValueError, ZeroDivisionError):
            raise ValueError(f"parameter {self.name}: interval {self.interval!r} is not one such as "
                             "'[0, 1)', '(0, inf)' or '[-1/2, inf)'") from None
        if not low <= high:
            raise ValueError(f"parameter {self.name}: interval {self.interval!r} is empty")
        object.__setattr__(self, "_bounds", (low, high, match[1] == "[", match[4] == "]"))

    def default_for(self, num_classes: int) -> float:
        """The default value for a problem with `num_classes` classes."""
        return float(self.default(num_classes) if callable(self.default) else self.default)

    def contains(self, value: float) -> bool:
        """Whether `value` lies in the parameter's interval."""
        low, high, low_closed, high_closed = self._bounds
        return ((low < value or (low_closed and value == low))
                and (value < high or (high_closed and value == high)))

    def nearest(self, value: float, margin: float = PROJECTION_MARGIN) -> float:
        """The value of the interval nearest `value`: `value` itself inside it, a closed end, or
        an open end moved inside by `margin` (relative to the end's size, at least absolute)."""
        low, high, low_closed, high_closed = self._bounds
        if self.contains(value):
            return value
        if value <= low:
            return low if low_closed else low + margin * max(1.0, abs(low))
        return high if high_closed else high - margin * max(1.0, abs(high))


def _as_floats(parameters: Sequence[float] | Tensor, what: str) -> List[float]:
    if isinstance(parameters, Tensor):
        return [float(v) for v in parameters.detach().flatten().tolist()]
    if isinstance(parameters, (str, bytes)) or not isinstance(parameters, Sequence):
        raise ValueError(f"the parameters of a {what} must be a list of numbers, got {parameters!r}")
    bad = [v for v in parameters if isinstance(v, bool) or not isinstance(v, numbers.Real)]
    if bad:
        raise ValueError(f"the parameters of a {what} must be numbers, got {bad[0]!r}")
    return [float(v) for v in parameters]


@dataclass(frozen=True)
class LossFamily:
    """A family of losses L_ω (docs/losses.md). `fixed`, when given, builds the fixed
    loss of `module` instead of `FixedLoss` (Taylor losses: a fused closed-form gradient)."""

    name: str
    parameters: Tuple[Parameter, ...]
    per_sample: PerSampleLoss
    order: Optional[int] = None
    fixed: Optional[Callable[[List[float]], torch.nn.Module]] = None
    doc: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", tuple(self.parameters))
        names = self.param_names()
        if not names or len(set(names)) != len(names):
            raise ValueError(f"loss family {self.name!r} needs at least one parameter, each with its "
                             f"own name, got {names}")

    @property
    def num_params(self) -> int:
        """How many parameters ω has."""
        return len(self.parameters)

    def describe(self) -> str:
        """'taylor loss of order 4', 'focal loss', ...: how messages name a loss of the family."""
        return f"{self.name} loss" + ("" if self.order is None else f" of order {self.order}")

    def _count(self) -> str:
        return f"{self.num_params} parameter" + ("" if self.num_params == 1 else "s")

    def _values(self, parameters: Sequence[float] | Tensor) -> List[float]:
        """`parameters` as floats; ValueError unless they are num_params numbers."""
        values = _as_floats(parameters, self.describe())
        if len(values) != self.num_params:
            raise ValueError(f"a {self.describe()} has {self._count()}, got {len(values)} "
                             f"(expected {', '.join(self.param_names())})")
        return values

    def param_names(self) -> List[str]:
        """The name of each entry of ω, in order."""
        return [p.name for p in self.parameters]

    def default_parameters(self, num_classes: int) -> List[float]:
        """ω at every parameter's default, for `num_classes` classes (meta-learning's start)."""
        return [p.default_for(num_classes) for p in self.parameters]

    def check(self, parameters: Sequence[float] | Tensor) -> None:
        """Raise ValueError unless `parameters` holds one finite number per parameter, each in its
        interval (ParameterRangeError, a ValueError, for a value that is not finite or not in it)."""
        values = self._values(parameters)
        for p, value in zip(self.parameters, values):
            if not (math.isfinite(value) and p.contains(value)):
                where = "" if p.interval == "(-inf, inf)" else f" and in {p.interval}"
                what = f" ({p.doc})" if p.doc else ""
                raise ParameterRangeError(f"{p.name}{what} of a {self.describe()} must be finite"
                                          f"{where}, got {p.name}={value!r}")

    def loss(self, logits: Tensor, target: Tensor, omega: Tensor, reduction: str = "mean") -> Tensor:
        """L_ω(logits, target), differentiable in `logits` and in the tensor `omega`."""
        _check_target(logits, target)
        if omega.numel() != self.num_params:
            raise ValueError(f"a {self.describe()} has {self._count()}, got {omega.numel()}")
        return _reduce(self.per_sample(logits, target, omega), reduction)

    def module(self, parameters: Sequence[float] | Tensor) -> torch.nn.Module:
        """The fixed loss with these parameters, for training; they are `check`ed (ValueError
        naming a value that is not finite or not in its interval)."""
        self.check(parameters)
        values = self._values(parameters)
        return self.fixed(values) if self.fixed is not None else FixedLoss(self, values)


class FixedLoss(torch.nn.Module):
    """A family's loss at fixed ω, called like F.cross_entropy(logits, target, reduction=...).

    ω is a buffer left out of state_dict: the loss is fixed at construction, as TaylorLoss's."""

    def __init__(self, family: LossFamily, parameters: Sequence[float]):
        super().__init__()
        family.check(parameters)
        self.family = family
        self.register_buffer("omega", torch.tensor(parameters, dtype=torch.float64), persistent=False)

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """The loss of `logits` (batch, classes) for integer `target` (batch,)."""
        return self.family.loss(logits, target, self.omega.to(logits.dtype), reduction)

    def extra_repr(self) -> str:
        values = ", ".join(f"{n}={v:g}" for n, v in zip(self.family.param_names(), self.omega.tolist()))
        return f"{self.family.describe()}: {values}"


@dataclass(frozen=True)
class OrderedFamily:
    """A family per order (an integer in `orders`): `make(order)` builds the LossFamily."""

    name: str
    orders: range
    make: Callable[[int], LossFamily]
    doc: str = ""

    def at(self, order: int) -> LossFamily:
        """The family of order `order`; ValueError outside `orders`."""
        if (not isinstance(order, int) or isinstance(order, bool) or order not in self.orders):
            raise ValueError(f"{self.name} order must be an integer in [{self.orders[0]}, "
                             f"{self.orders[-1]}], got {order!r}")
        return _made(self, order)


@functools.lru_cache(maxsize=None)
def _made(family: OrderedFamily, order: int) -> LossFamily:
    made = family.make(order)
    if (made.name, made.order) != (family.name, order):
        raise ValueError(f"{family.name}'s make({order}) built the family {made.name!r} of order "
                         f"{made.order!r}, expected {family.name!r} of order {order}")
    return made


Family = LossFamily | OrderedFamily
_REGISTRY: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register `family` under its name; the same family again is a no-op, another family under a
    taken name raises ValueError. A name must be an identifier not ending in a digit (`taylor4`
    spells the ordered family `taylor` of order 4). Returns `family`."""
    if not isinstance(family, (LossFamily, OrderedFamily)):
        raise TypeError(f"register a LossFamily or an OrderedFamily, got {family!r}")
    if not isinstance(family.name, str) or not _NAME.fullmatch(family.name):
        raise ValueError(f"loss family name {family.name!r}: expected letters, digits and '_', not "
                         "starting or ending with a digit")
    if isinstance(family, LossFamily) and family.order is not None:
        raise ValueError(f"loss family {family.name!r} has order {family.order}: register families "
                         "with orders as an OrderedFamily")
    registered = _REGISTRY.setdefault(family.name, family)
    if registered != family:
        raise ValueError(f"another loss family is already registered as {family.name!r}; register "
                         "yours under another name")
    return family


def _import_plugins() -> None:
    """Import the modules named in DOMAINBED_ITL_FAMILIES (they register their families)."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except Exception as error:  # a user's module may raise anything while it is imported
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
            raise ValueError(f"{PLUGINS_ENV} names the module {module!r}, which cannot be imported: "
                             f"{type(error).__name__}: {first}") from error


def family_names() -> Tuple[str, ...]:
    """The registered family names, sorted."""
    _import_plugins()
    return tuple(sorted(_REGISTRY))


def _lookup(name: str) -> Family:
    """The family `name`; the plugins are imported only for a name not built in (a plugin cannot
    replace a built-in family), so that a bad plugin fails where a family of its is wanted."""
    family = _REGISTRY.get(name)
    if family is None:
        _import_plugins()
        family = _REGISTRY.get(name)
    if family is None:
        raise ValueError(f"unknown loss family {name!r}; expected one of {', '.join(family_names())} "
                         f"(a family of your own is known where it is registered; other processes "
                         f"import it from the modules named in {PLUGINS_ENV})")
    return family


def get_family(name: str, order: Optional[int] = None) -> LossFamily:
    """The registered family `name`; with `order` for families with orders (taylor: 2..5)."""
    family = _lookup(name)
    if isinstance(family, OrderedFamily):
        if order is None:
            raise ValueError(f"the {name} family needs an order in [{family.orders[0]}, "
                             f"{family.orders[-1]}]")
        return family.at(order)
    if order is not None:
        raise ValueError(f"the {name} family takes no order, got order={order!r}")
    return family


def family_orders(name: str) -> Optional[range]:
    """The orders of the registered family `name`, None for a family without orders; ValueError
    for an unknown name."""
    family = _lookup(name)
    return family.orders if isinstance(family, OrderedFamily) else None


def family_spellings() -> Tuple[str, ...]:
    """Every name a command line accepts for a family: each name, and for families with orders
    also name + order ('taylor', 'taylor2', ..., 'taylor5')."""
    spellings = []
    for name in family_names():
        family = _REGISTRY[name]
        spellings.append(name)
        if isinstance(family, OrderedFamily):
            spellings += [f"{name}{k}" for k in family.orders]
    return tuple(spellings)


def split_spelling(text: str) -> Tuple[str, Optional[int]]:
    """(name, order) of a command-line spelling: ('taylor', 4) for 'taylor4', ('sce', None) for
    'sce', and (text, None) for a name that is not registered."""
    match = re.fullmatch(r"(.*?)([0-9]+)", text)
    if match and isinstance(_REGISTRY.get(match[1]), OrderedFamily):
        return match[1], int(match[2])
    return text, None


def project(family: LossFamily, omega: Sequence[float] | Tensor,
            margin: float = PROJECTION_MARGIN) -> Tuple[List[float] | Tensor, Tuple[str, ...]]:
    """(ω', moved): ω with every entry put back into its parameter's interval (`Parameter.nearest`:
    the nearest closed end, or `margin` inside an open one), and the names of the entries that
    moved (empty if ω was inside). A tensor comes back as a tensor of its dtype and device, a
    sequence as floats. ParameterRangeError for an entry that is not finite: no nearest value."""
    values = family._values(omega)
    for p, value in zip(family.parameters, values):
        if not math.isfinite(value):
            raise ParameterRangeError(f"{p.name} of a {family.describe()} must be finite to be "
                                      f"projected into {p.interval}, got {p.name}={value!r}")
    projected = [p.nearest(v, margin) for p, v in zip(family.parameters, values)]
    moved = tuple(p.name for p, a, b in zip(family.parameters, values, projected) if a != b)
    if isinstance(omega, Tensor):
        return torch.tensor(projected, dtype=omega.dtype, device=omega.device).view_as(omega), moved
    return projected, moved
