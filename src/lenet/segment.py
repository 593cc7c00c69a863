"""Finding the separate digits in a line of handwriting, left to right.

Works on the ink mask from ``preprocess.find_ink``: connected strokes are grouped into digits
(a 5 with a detached top bar, a 4 in two strokes and a 7 with a crossbar overlap in x), and a
blob much wider than a digit is tall is cut where the ink is thinnest (touching digits).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# A digit is rarely wider than this times the line's digit height; wider blobs are
# touching digits (two touching digits measure about 1.6).
MAX_DIGIT_ASPECT = 1.4
# Groups whose x-ranges overlap by this share of the narrower one are one digit.
MERGE_OVERLAP = 0.3
# A group shorter than this share of the line's digit height is a detached part (the bar of
# a 5 or a 7), joined to its nearest neighbour rather than read as a digit.
PART_HEIGHT = 0.5


def _groups(mask: np.ndarray) -> list[np.ndarray]:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    spans = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        spans.append([sl[1].start, sl[1].stop, [index]])
    spans.sort(key=lambda s: s[0])
    merged: list[list] = []
    for start, stop, ids in spans:
        if merged:
            last = merged[-1]
            overlap = min(stop, last[1]) - max(start, last[0])
            narrower = min(stop - start, last[1] - last[0])
            if overlap >= MERGE_OVERLAP * narrower:
                last[1] = max(last[1], stop)
                last[2] += ids
                continue
        merged.append([start, stop, ids])
    parts = [np.isin(labels, ids) for _, _, ids in merged]
    return _join_small_parts(parts)


def _join_small_parts(parts: list[np.ndarray]) -> list[np.ndarray]:
    if len(parts) < 2:
        return parts
    heights = [np.ptp(np.nonzero(p)[0]) + 1 for p in parts]
    line_height = float(np.median(heights))
    centres = [float(np.nonzero(p)[1].mean()) for p in parts]
    small = [i for i, h in enumerate(heights) if h < PART_HEIGHT * line_height]
    if len(small) == len(parts):
        return parts
    joined = [p.copy() for p in parts]
    for i in small:
        others = [j for j in range(len(parts)) if j not in small]
        nearest = min(others, key=lambda j: abs(centres[j] - centres[i]))
        joined[nearest] |= parts[i]
    return [p for i, p in enumerate(joined) if i not in small]


def _split_wide(part: np.ndarray, height: float) -> list[np.ndarray]:
    ys, xs = np.nonzero(part)
    x0, x1 = xs.min(), xs.max() + 1
    width = x1 - x0
    pieces = int(round(width / (0.8 * height)))
    if width <= MAX_DIGIT_ASPECT * height or pieces < 2:
        return [part]
    profile = part[:, x0:x1].sum(axis=0).astype(float)
    cuts = []
    for k in range(1, pieces):
        centre = k * width / pieces
        lo, hi = int(centre - 0.25 * width / pieces), int(centre + 0.25 * width / pieces) + 1
        cuts.append(x0 + lo + int(np.argmin(profile[lo:hi])))
    out, left = [], x0
    for cut in [*cuts, x1]:
        piece = np.zeros_like(part)
        piece[:, left:cut] = part[:, left:cut]
        if piece.any():
            out.append(piece)
        left = cut
    return out


def split_digits(mask: np.ndarray) -> list[np.ndarray]:
    """Masks of the individual digits in ``mask``, ordered left to right."""
    parts = _groups(mask)
    if not parts:
        return []
    height = float(np.median([np.ptp(np.nonzero(p)[0]) + 1 for p in parts]))
    out = []
    for part in parts:
        out += _split_wide(part, height)
    return out
