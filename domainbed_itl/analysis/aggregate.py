"""Mean ± standard error over runs: the one function behind every table's mean ± SE.

See docs/analyses.md.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np


def mean_se(values: Sequence[float], ddof: int = 0, finite_only: bool = True) -> Dict[str, float]:
    """{mean, se, min, max, n} of `values`; se = std(ddof) / √n (docs/analyses.md).

    With `finite_only`, NaN and infinite entries (e.g. no sample) are dropped first. With no
    value left every statistic is NaN and n is 0; se is NaN also when n <= ddof.
    """
    kept = [float(v) for v in values if v is not None and (math.isfinite(v) or not finite_only)]
    data = np.asarray(kept, dtype=float)
    n = int(data.size)
    if n == 0:
        return {"mean": math.nan, "se": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    se = float(data.std(ddof=ddof) / math.sqrt(n)) if n > ddof else math.nan
    return {"mean": float(data.mean()), "se": se, "min": float(data.min()),
            "max": float(data.max()), "n": n}
