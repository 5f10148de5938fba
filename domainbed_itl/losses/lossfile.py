"""Loss files: a learned loss saved as JSON (family, order, parameters, provenance).

See docs/losses.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..files.atomic import write_atomic
from ..files.reading import SMALL_TEXT_LIMIT, UnreadableFile, read_text
from ..files.schemas import LOSS_FORMAT, LOSS_VERSIONS, LossFile, SchemaError, check, check_version
from .families import get_family
from .learned import LEARNED
from .taylor import ITL_PARAMETERS

FORMAT = LOSS_FORMAT
VERSION = max(LOSS_VERSIONS)


class LossFileError(ValueError):
    """A loss file that cannot be read or is not a valid loss."""


@dataclass
class LossSpec:
    """A fully specified loss: a registered family, its order (families with orders only),
    parameters ω (checked by the family: count, finiteness, intervals) and provenance."""

    family: str
    order: Optional[int]
    parameters: List[float]
    provenance: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.parameters, (list, tuple)):
            raise ValueError(f"loss parameters must be a list of numbers, got {self.parameters!r}")
        get_family(self.family, self.order).check(self.parameters)
        self.parameters = [float(v) for v in self.parameters]

    def module(self) -> torch.nn.Module:
        """The loss as a module called like F.cross_entropy(logits, target, reduction=...)."""
        return get_family(self.family, self.order).module(self.parameters)

    def definition(self) -> Dict[str, Any]:
        """What the loss computes (family, order, parameters), without its provenance."""
        return {"family": self.family, "order": self.order, "parameters": list(self.parameters)}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save the loss as a loss file (`save_loss`)."""
        return save_loss(path, self, overwrite)

    def to_dict(self) -> Dict[str, Any]:
        """The loss-file JSON object (docs/losses.md)."""
        return {"format": FORMAT, "version": VERSION, "family": self.family, "order": self.order,
                "parameters": self.parameters, "provenance": self.provenance}


LOSS_PRESETS: Dict[str, LossSpec] = {
    "ITL": LossSpec("taylor", 4, list(ITL_PARAMETERS),
                    {"source": "Gao et al. (ICML 2022), Table 8", "meta_train_dataset": "RotatedMNIST",
                     "steps": 200}),
    **{name: LossSpec(spec["family"], spec["order"], list(spec["parameters"]), dict(spec["provenance"]))
       for name, spec in LEARNED.items()},
}


def save_loss(path: str | os.PathLike, spec: LossSpec, overwrite: bool = False) -> Path:
    """Save `spec` as a loss file (atomically); refuse to replace an existing file unless told.

    Raises atomic.OutputExists (a FileExistsError) when `path` exists and `overwrite` is false.
    """
    from .. import __version__

    data = spec.to_dict()
    data["provenance"] = {"package_version": __version__, **spec.provenance}
    return write_atomic(path, json.dumps(data, indent=2) + "\n", overwrite=overwrite)


def load_loss(path: str | os.PathLike) -> LossSpec:
    """Read and validate a loss file (its schema: domainbed_itl.files.schemas.LossFile, then its
    family's checks); raise LossFileError naming the file and the problem."""
    path = Path(path)
    where = f"loss file {path}"
    try:
        text = read_text(path, SMALL_TEXT_LIMIT, "loss file")
    except UnreadableFile as e:
        raise LossFileError(f"cannot read {where}: it {e.reason}") from None
    except OSError as e:
        raise LossFileError(f"cannot read {where}: {getattr(e, 'strerror', None) or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LossFileError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise LossFileError(f"{where} must hold a JSON object, got {type(data).__name__}")
    try:
        check_version(data, LOSS_VERSIONS, where)
        loaded = check(LossFile, data, where)
    except SchemaError as e:
        raise LossFileError(str(e)) from None
    try:
        return LossSpec(loaded.family, loaded.order, list(loaded.parameters), dict(loaded.provenance))
    except ValueError as e:
        raise LossFileError(f"{where}: {e}") from e


def resolve_loss(name_or_path: str) -> LossSpec:
    """A preset name (e.g. 'ITL') or the path of a loss file."""
    if name_or_path in LOSS_PRESETS:
        return LOSS_PRESETS[name_or_path]
    if not os.path.exists(name_or_path):
        raise LossFileError(
            f"{name_or_path!r} is neither a preset loss ({', '.join(LOSS_PRESETS)}) nor an existing "
            "loss file")
    return load_loss(name_or_path)
