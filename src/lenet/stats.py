"""Order statistics for small arrays, where NumPy's per-call overhead outweighs the work."""

from __future__ import annotations

import numpy as np


def quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile``'s values (linear interpolation), for fractions ``qs`` in [0, 1].

    One partial sort instead of a full one, and without np.percentile's per-call overhead, which
    on pictures this small costs more than the work itself.
    """
    flat = np.asarray(values).ravel()
    last = flat.size - 1
    positions = [q * last for q in qs]
    lows = [int(p) for p in positions]
    part = np.partition(flat, sorted({*lows, *(min(k + 1, last) for k in lows)}))
    out = []
    for position, low in zip(positions, lows):
        a, b = float(part[low]), float(part[min(low + 1, last)])
        out.append(a + (b - a) * (position - low))
    return out


def median(values: np.ndarray | list[float]) -> float:
    """The median, as ``np.median`` gives it."""
    return quantiles(np.asarray(values), (0.5,))[0]
