"""Writing an analysis' figure and the numbers behind it: all files or, on refusal, none.

See docs/files.md.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, List, Mapping, Sequence

from ..files.outputs import OutputPlan, figure_format, plan_outputs


def json_ready(value: Any) -> Any:
    """`value` with NaN and infinities as None (JSON has no NaN) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def plan_analysis(output_dir: str | os.PathLike, stem: str, overwrite: bool = False,
                  text_suffixes: Sequence[str] = ()) -> OutputPlan:
    """The outputs of an analysis, checked before its work (domainbed_itl.files.outputs):
    `<stem>.png` (the figure), `<stem>.json` (the numbers) and `<stem><suffix>` per text."""
    output_dir = Path(output_dir)
    png = output_dir / f"{stem}.png"
    paths = [png, output_dir / f"{stem}.json", *(output_dir / f"{stem}{s}" for s in text_suffixes)]
    return plan_outputs(paths, overwrite, figures=[png])


def figure_bytes(figure: Any, path: str | os.PathLike, **savefig: Any) -> bytes:
    """The matplotlib `figure` rendered in the format `path` names (its extension)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=figure_format(path), **savefig)
    return buffer.getvalue()


def write_outputs(plan: OutputPlan, figure: Any, numbers: Mapping[str, Any],
                  texts: Mapping[str, str] | None = None) -> List[Path]:
    """Write the outputs `plan_analysis` planned: the figure, `numbers` as JSON and each
    `texts[suffix]`, each atomically."""
    png, numbers_path, *text_paths = plan.paths
    payloads = {numbers_path: json.dumps(json_ready(numbers), indent=1) + "\n",
                **{path: texts[path.name[len(png.stem):]] for path in text_paths},
                png: figure_bytes(figure, png, dpi=150, bbox_inches="tight")}
    return [plan.write(path, data) for path, data in payloads.items()]
