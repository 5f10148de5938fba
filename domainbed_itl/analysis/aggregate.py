"""Mean ± standard error over runs, as DomainBed reports it."""

from __future__ import annotations

import math
from typing import Dict, Sequence


def mean_se(values: Sequence[float]) -> Dict[str, float]:
    """{mean, se, min, max, n} of the finite `values`; NaN entries (e.g. no sample) are dropped.

    se is the population standard deviation over √n, as DomainBed's `format_mean` computes the
    standard error over trials, so that these numbers sit beside `collect_results`' tables.
    With no finite value every statistic is NaN and n is 0.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"mean": math.nan, "se": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / n)
    return {"mean": mean, "se": std / math.sqrt(n), "min": min(finite), "max": max(finite), "n": n}
