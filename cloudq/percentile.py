"""The one percentile every figure cloudq reports uses (client stats, gateway, benchmarks, tests)."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (``q`` from 0 to 100) of ``values``, NaN if there are none.

    Definition: linear interpolation between the two nearest ranks of the sorted values, at rank
    ``(n - 1) * q / 100`` counted from 0 — numpy's default, Excel's ``PERCENTILE.INC``; ``q = 50``
    is the usual median (:func:`statistics.median`)."""
    s = sorted(values)
    if not s:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi, frac = min(lo + 1, len(s) - 1), k - lo
    if frac == 0 or s[lo] == s[hi]:  # exact rank (and inf stays inf, not inf - inf)
        return s[lo]
    return s[lo] + (s[hi] - s[lo]) * frac
