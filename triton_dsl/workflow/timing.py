"""The spread of measured times, as every benchmark reports it."""
from __future__ import annotations

import statistics


def spread(ts) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of the times."""
    if len(ts) < 2:
        return ts[0], ts[0], ts[0]
    q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return statistics.median(ts), q1, q3
