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
# From this width (times the digit height) up to MAX_DIGIT_ASPECT a blob may be one wide digit
# or two touching narrow ones (a 1 or 7 against its neighbour measures 0.8 to 1.4): the
# recognizer decides (Recognizer.read). Measured on 200 touching pairs, 300 numbers and 500
# single digits (tests/userstyle.py, seeds 5, 7, 9): 1.0 read 15 more pairs, the same numbers
# and one more single digit as two; 0.8 and 0.9 cost numbers, 1.1 read fewer pairs.
AMBIGUOUS_ASPECT = 1.0
# Two tall groups are one digit (a 4 in two strokes) when their x-ranges overlap by this share
# of the narrower one; a small group (a detached bar) joins with less.
MERGE_OVERLAP_TALL = 0.6
MERGE_OVERLAP_SMALL = 0.3
# A group shorter than this share of the line's digit height is a part of a digit.
PART_HEIGHT = 0.5
# Wider than this times its height is a ruled line or an underline, never a digit.
LINE_ASPECT = 4.0
MAX_PIECES = 8
# A stroke's pixels touch by a side or a corner (a thin diagonal stroke is one piece).
ALL_NEIGHBOURS = np.ones((3, 3), bool)


def bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Rows y0:y1 and columns x0:x1 (end exclusive) that hold all True pixels of ``mask``."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` grown by ``steps`` pixels up, down, left and right: what
    ``ndimage.binary_dilation(mask, iterations=steps)`` gives, by array shifts that take a
    fraction of its time on a digit-sized crop."""
    out = mask
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def group_strokes(mask: np.ndarray) -> list[np.ndarray]:
    """Masks of the digits (groups of strokes) in ``mask``, left to right, lines left out."""
    labels, count = ndimage.label(mask, structure=ALL_NEIGHBOURS)
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


def digit_height(parts: list[np.ndarray]) -> float:
    """The typical height of the digits in a line: the median of its parts' heights."""
    return median([y1 - y0 for y0, y1, _, _ in map(bounds, parts)])


def split_digits(mask: np.ndarray) -> list[np.ndarray]:
    """Masks of the individual digits in ``mask``, ordered left to right."""
    parts = group_strokes(mask)
    if not parts:
        return []
    height = digit_height(parts)
    out = []
    for part in parts:
        out += _split_wide(part, height)
    return out


def split_in_two(part: np.ndarray, height: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The two halves of ``part`` if it may be two touching digits, else None.

    Only a part as wide as AMBIGUOUS_ASPECT to MAX_DIGIT_ASPECT times the line's digit
    ``height`` qualifies (a wider one is already cut by ``split_digits``); it is cut at the
    thinnest column of its middle 40%. Whether it is one wide digit or two is for the
    recognizer to say: a wide 0 has a thin middle too.
    """
    _, _, x0, x1 = bounds(part)
    width = x1 - x0
    if not AMBIGUOUS_ASPECT * height <= width <= MAX_DIGIT_ASPECT * height:
        return None
    profile = part[:, x0:x1].sum(axis=0)
    lo, hi = int(width * 0.3), int(width * 0.7) + 1
    cut = x0 + lo + int(np.argmin(profile[lo:hi]))
    left, right = np.zeros_like(part), np.zeros_like(part)
    left[:, x0:cut], right[:, cut:x1] = part[:, x0:cut], part[:, cut:x1]
    if not left.any() or not right.any():
        return None
    return left, right
