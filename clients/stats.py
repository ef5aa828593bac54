"""The one percentile of voxserve's measurements: the load tester, its summary and the bench
scripts all report percentiles from here, with numpy's default definition (linear interpolation
between the two nearest ranks, ``numpy.percentile(values, q)``), so their figures compare.

Standard library only: the load tester runs where numpy is the only third-party package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from clients.errors import InvalidInput

__all__ = ["percentile"]


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation, as ``numpy.percentile``;
    None for no values. None and NaN values are left out."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise InvalidInput(f"percentile {q} is outside [0, 100]")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
