"""Settings declared once: a dataclass field carries its default, help text and `Rule`, and
everything else (validation, command-line flags, saved layouts) is read off the fields.

A `Settings` dataclass validates its fields by their rules; a composed one (`Composed`) holds
other Settings as parts and also takes, reads and writes its leaves by their flat names.
See docs/meta_learning.md#settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

FLOAT32_MAX = torch.finfo(torch.float32).max


class SettingsError(ValueError):
    """A setting's value is refused; `setting` names the setting (e.g. "inner_steps")."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Rule:
    """What values a setting takes. kind: "int", "float", "choice", "bool" or "widths" (a
    non-empty tuple of positive integers); low/high bound a number (open with low_open/high_open;
    a float is at most float32's maximum); optional: None is allowed too; label: the setting's
    name in a message about an unknown choice; expected: the message's wording of the rule;
    registry: a choice's names read when a value is checked (a registry users extend), in place
    of `choices`."""

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Tuple[str, ...] = ()
    registry: Optional[Callable[[], Tuple[str, ...]]] = None
    optional: bool = False
    label: Optional[str] = None
    expected: Optional[str] = None

    def options(self) -> Tuple[str, ...]:
        """The names a choice takes: the registry's now, else `choices`."""
        return self.registry() if self.registry is not None else self.choices

    def expectation(self) -> str:
        """The rule in words, as messages give it."""
        if self.expected is not None:
            return self.expected
        if self.kind == "bool":
            return "true or false"
        if self.kind == "int":
            return "a positive integer" if self.low == 1 else f"an integer >= {self.low:g}"
        if self.low is not None and self.high is not None:
            return (f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        limit = f" no larger than float32's maximum {FLOAT32_MAX:.4g}"
        return ("a positive number" if self.low_open else f"a number >= {self.low:g}") + limit

    def admits(self, value: Any) -> bool:
        """Whether `value` follows the rule."""
        if value is None:
            return self.optional
        if self.kind == "choice":
            return value in self.options()
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "widths":
            return all(self.admits_number(w, int) for w in value)
        return self.admits_number(value, int if self.kind == "int" else (int, float))

    def admits_number(self, value: Any, types: Any) -> bool:
        """Whether `value` is a number of `types` (never a bool) within the bounds."""
        if not isinstance(value, types) or isinstance(value, bool):
            return False
        high = self.high if self.high is not None else (FLOAT32_MAX if self.kind == "float" else None)
        low = self.low if self.kind != "widths" else 1
        return ((low is None or (value > low if self.low_open else value >= low)) and
                (high is None or (value < high if self.high_open else value <= high)))

    def check(self, name: str, value: Any) -> None:
        """SettingsError naming `name`, the value and what is expected unless `value` follows."""
        if self.kind == "widths" and not value:
            raise SettingsError(name, f"{name} must list at least one width (two weight layers), "
                                      f"got {value!r}")
        if self.admits(value):
            return
        if self.kind == "choice":
            raise SettingsError(name, f"unknown {self.label or name} {value!r}; expected one of "
                                      f"{', '.join(self.options())}")
        if self.kind == "widths":
            bad = next(w for w in value if not self.admits_number(w, int))
            raise SettingsError(name, f"every {name} width must be a positive integer, got {bad!r}")
        raise SettingsError(name, f"{name} must be {self.expectation()}, got {value!r}")


def setting(default: Any, help: str = "", **rule: Any) -> Any:
    """A dataclass field declared once: its default, its help text and its Rule (keywords)."""
    return field(default=default, metadata={"help": help, "rule": Rule(**rule)})


def part(kind: type) -> Any:
    """A field holding a Settings part (its defaults)."""
    return field(default_factory=kind, metadata={"part": kind})


def same_setting(kind: type, name: str) -> Any:
    """A field declared as `kind`'s setting `name` (its default, help and rule), for another
    Settings class that takes the same setting."""
    f = kind.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


def rule_of(f: dataclasses.Field) -> Optional[Rule]:
    """The Rule of a field declared with `setting` (None for other fields)."""
    return f.metadata.get("rule")


def leaves(kind: type) -> Iterator[dataclasses.Field]:
    """The setting fields of the Settings class `kind`, its parts' fields in their place."""
    for f in dataclasses.fields(kind):
        if "part" in f.metadata:
            yield from leaves(f.metadata["part"])
        elif rule_of(f) is not None:
            yield f


def leaf_names(kind: type) -> Tuple[str, ...]:
    """The flat names of every setting of `kind`."""
    return tuple(f.name for f in leaves(kind))


class Settings:
    """A frozen dataclass of `setting` fields, each checked by its rule on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            rule = rule_of(f)
            if rule is not None and rule.kind == "widths":
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
            if rule is not None:
                rule.check(f.name, getattr(self, f.name))

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a plain dict (parts as nested dicts)."""
        return dataclasses.asdict(self)

    def flat(self) -> Dict[str, Any]:
        """Every setting by its flat name, parts' settings in their place."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out.update(value.flat() if "part" in f.metadata else {f.name: value})
        return out

    def replace(self, **changes: Any):
        """A copy with `changes` (flat names)."""
        return type(self)(**{**self.flat(), **changes})


def split_values(kind: type, values: Mapping[str, Any]) -> Dict[str, Any]:
    """`values` by flat names, by part names (a part or a dict of it), or both, as keywords of
    `kind`'s fields; SettingsError for names `kind` does not have."""
    fields = {f.name: f for f in dataclasses.fields(kind)}
    owner = {leaf: f.name for f in fields.values() if "part" in f.metadata
             for leaf in leaf_names(f.metadata["part"])}
    own: Dict[str, Any] = {}
    parts: Dict[str, Dict[str, Any]] = {}
    for name, value in values.items():  # whole parts first, then single settings over them
        if name in fields and "part" in fields[name].metadata:
            given = value.flat() if isinstance(value, Settings) else dict(value)
            parts.setdefault(name, {}).update(given)
    for name, value in values.items():
        if name in fields and "part" in fields[name].metadata:
            continue
        if name in owner:
            parts.setdefault(owner[name], {})[name] = value
        elif name in fields:
            own[name] = value
        else:
            unknown = sorted(set(values) - set(fields) - set(owner))
            raise SettingsError(unknown[0], f"unknown setting(s) {', '.join(unknown)}")
    for name, given in parts.items():
        kind = fields[name].metadata["part"]
        unknown = sorted(set(given) - set(kind.__dataclass_fields__))
        if unknown:
            raise SettingsError(unknown[0], f"unknown setting(s) {', '.join(unknown)}")
        own[name] = kind(**given)
    return own


class Composed(Settings):
    """Settings made of parts; built from flat names, part names or both (see split_values),
    and reading a part's setting by its flat name (config.inner_steps)."""

    def __init__(self, **values: Any):
        given = split_values(type(self), values)
        for f in dataclasses.fields(self):
            if f.name in given:
                value = given[f.name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            object.__setattr__(self, f.name, value)
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for f in dataclasses.fields(self):
            if "part" in f.metadata and name in f.metadata["part"].__dataclass_fields__:
                return getattr(object.__getattribute__(self, f.name), name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
