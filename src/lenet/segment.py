"""Finding the separate digits in a line of handwriting, left to right.

Works on the ink mask from ``preprocess.find_ink``: connected strokes are grouped into digits
(a 5 with a detached top bar, a 4 in two strokes and a 7 with a crossbar overlap in x), and a
blob much wider than a digit is tall is cut where the ink is thinnest (touching digits).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lenet.stats import median

# A digit is rarely wider than this times the line's digit height; wider blobs are
# touching digits (two touching digits measure about 1.6).
MAX_DIGIT_ASPECT = 1.4
# Two tall groups are one digit (a 4 in two strokes) when their x-ranges overlap by this share
# of the narrower one; a small group (a detached bar) joins with less.
MERGE_OVERLAP_TALL = 0.6
MERGE_OVERLAP_SMALL = 0.3
# A group shorter than this share of the line's digit height is a part of a digit.
PART_HEIGHT = 0.5
# Wider than this times its height is a ruled line or an underline, never a digit.
LINE_ASPECT = 4.0
MAX_PIECES = 8


def bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Rows y0:y1 and columns x0:x1 (end exclusive) that hold all True pixels of ``mask``."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def group_strokes(mask: np.ndarray) -> list[np.ndarray]:
    """Masks of the digits (groups of strokes) in ``mask``, left to right, lines left out."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    boxes = [
        (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop) for sl in ndimage.find_objects(labels)
    ]
    items = [
        [x0, x1, y0, y1, [i + 1]]
        for i, (y0, y1, x0, x1) in enumerate(boxes)
        if (x1 - x0) <= LINE_ASPECT * (y1 - y0)
    ]
    if not items:
        return []
    line_height = median([y1 - y0 for _, _, y0, y1, _ in items])
    items.sort(key=lambda item: item[0])
    merged: list[list] = []
    for x0, x1, y0, y1, ids in items:
        if merged:
            last = merged[-1]
            overlap = min(x1, last[1]) - max(x0, last[0])
            narrower = min(x1 - x0, last[1] - last[0])
            tall = min(y1 - y0, last[3] - last[2]) >= PART_HEIGHT * line_height
            needed = MERGE_OVERLAP_TALL if tall else MERGE_OVERLAP_SMALL
            if overlap >= needed * narrower:
                last[0], last[1] = min(last[0], x0), max(last[1], x1)
                last[2], last[3] = min(last[2], y0), max(last[3], y1)
                last[4] += ids
                continue
        merged.append([x0, x1, y0, y1, ids])
    parts = []
    for *_, ids in merged:
        wanted = np.zeros(count + 1, bool)
        wanted[ids] = True
        parts.append(wanted[labels])
    heights = [y1 - y0 for _, _, y0, y1, _ in merged]
    return _join_small_parts(parts, heights)


def _join_small_parts(parts: list[np.ndarray], heights: list[int]) -> list[np.ndarray]:
    """Join each short group to the digit it touches or nearly touches; drop stray marks."""
    if len(parts) < 2:
        return parts
    line_height = median(heights)
    small = {i for i, h in enumerate(heights) if h < PART_HEIGHT * line_height}
    if len(small) == len(parts):
        return parts
    extents = [bounds(p) for p in parts]

    def gap(i: int, j: int) -> float:
        (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = extents[i], extents[j]
        return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1, 0)

    joined = [p.copy() for p in parts]
    for i in small:
        nearest = min((j for j in range(len(parts)) if j not in small), key=lambda j: gap(i, j))
        if gap(i, nearest) <= PART_HEIGHT * line_height:
            joined[nearest] |= parts[i]
    return [p for i, p in enumerate(joined) if i not in small]


def _split_wide(part: np.ndarray, height: float) -> list[np.ndarray]:
    _, _, x0, x1 = bounds(part)
    width = x1 - x0
    pieces = min(MAX_PIECES, int(round(width / (0.8 * height))))
    if width <= MAX_DIGIT_ASPECT * height or pieces < 2:
        return [part]
    profile = part[:, x0:x1].sum(axis=0).astype(float)
    typical = median(profile[profile > 0])
    cuts = []
    for k in range(1, pieces):
        centre = k * width / pieces
        lo, hi = int(centre - 0.25 * width / pieces), int(centre + 0.25 * width / pieces) + 1
        best = lo + int(np.argmin(profile[lo:hi]))
        # Cut only at a real valley in the ink: a wide digit has none.
        if profile[best] <= 0.6 * typical:
            cuts.append(x0 + best)
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
    parts = group_strokes(mask)
    if not parts:
        return []
    height = median([y1 - y0 for y0, y1, _, _ in map(bounds, parts)])
    out = []
    for part in parts:
        out += _split_wide(part, height)
    return out
