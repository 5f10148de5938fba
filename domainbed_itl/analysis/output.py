"""Writing an analysis' figure and the numbers behind it: all files or, on refusal, none."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping

from ..files.atomic import OutputExists, write_atomic


def json_ready(value: Any) -> Any:
    """`value` with NaN and infinities as None (JSON has no NaN) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_outputs(output_dir: str | os.PathLike, stem: str, figure: Any, numbers: Mapping[str, Any],
                  texts: Mapping[str, str] | None = None, overwrite: bool = False) -> List[Path]:
    """Write `<stem>.png` (the matplotlib `figure`), `<stem>.json` (`numbers`) and each
    `texts[suffix]` as `<stem><suffix>` (e.g. ".csv") into `output_dir`, each atomically.

    Without `overwrite`, nothing is written when any of the files exists (OutputExists names it).
    """
    output_dir = Path(output_dir)
    payloads: Dict[Path, bytes | str] = {
        output_dir / f"{stem}.json": json.dumps(json_ready(numbers), indent=1) + "\n"}
    for suffix, text in (texts or {}).items():
        payloads[output_dir / f"{stem}{suffix}"] = text
    png = output_dir / f"{stem}.png"
    if not overwrite:
        taken = [str(p) for p in [*payloads, png] if p.exists()]
        if taken:
            raise OutputExists(f"{', '.join(taken)} exist(s); pass --overwrite to replace, or choose "
                               "another --output_dir")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    payloads[png] = buffer.getvalue()
    return [write_atomic(path, data, overwrite=overwrite) for path, data in payloads.items()]
