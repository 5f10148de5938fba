"""Typed errors that name the options of the call able to fix them; scripts/ spell them as flags.

See docs/files.md (errors and their remedies).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Tuple

# An option inside a message: "\0name\0" or "\0name|how a Python caller reads it\0".
_OPTION = re.compile("\0([^\0|]*)(?:\\|([^\0]*))?\0")

Spell = Callable[[str], str]


def option(name: str, plain: Optional[str] = None) -> str:
    """A placeholder for the option `name` inside a message: a Python caller reads `plain`
    (default `name=True`), a command reads the flag that sets it (`spelled`)."""
    return f"\0{name}|{plain}\0" if plain else f"\0{name}\0"


OVERWRITE = option("overwrite")
RESUME = option("resume")


def keyword(name: str) -> str:
    """An option as a Python caller passes it: `overwrite=True`."""
    return f"{name}=True"


def spelled(text: str, spell: Spell = keyword) -> str:
    """`text` with its options written by `spell` (a plain placeholder keeps its plain words
    unless `spell` is not `keyword`)."""
    def one(match: re.Match) -> str:
        name, plain = match.group(1), match.group(2)
        return plain if plain is not None and spell is keyword else spell(name)
    return _OPTION.sub(one, text)


def options(text: str) -> Tuple[str, ...]:
    """The names of the options `text` names, in order."""
    return tuple(m.group(1) for m in _OPTION.finditer(text))


def wording(error: BaseException) -> str:
    """`error`'s message with its option placeholders, for a message that wraps it."""
    return getattr(error, "wording", None) or str(error)


def reworded(error: BaseException, text: str, **fields: Any) -> BaseException:
    """`error` given the message `text` (with option placeholders): its str() reads the options
    as keywords, `wording` keeps the placeholders and `remedy` names the options."""
    error.wording, error.remedy = text, options(text)  # type: ignore[attr-defined]
    for name, value in fields.items():
        setattr(error, name, value)
    return error


class Worded:
    """Mixin of an exception whose message names options of the call (`remedy`, e.g.
    ("overwrite",) or ("resume", "overwrite")); `fields` become attributes (the path, ...)."""

    wording: str
    remedy: Tuple[str, ...]

    def __init__(self, text: str, **fields: Any) -> None:
        super().__init__(spelled(text))  # type: ignore[call-arg]
        reworded(self, text, **fields)  # type: ignore[arg-type]
