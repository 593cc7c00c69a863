"""Ruled and squared paper: the printed lines that cross a picture from side to side are taken
out of the ink, so that a digit written on them, or across them, is read alone.

A digit that touches a rule is one piece of ink with it. Without this step that piece runs
from edge to edge and is read as a desk or a frame (left out: "no digit found") or as the digit
with a bar through it. A rule is told from a stroke by four things at once: it is thin, it runs
from one side of the picture to the other along a straight line or a gentle curve (as the lines
of a page do in any crop of it), it is more than twice as long as the tallest piece of ink left
beside it (so the bar of a tightly cropped 7, which also spans the picture, stays), and it is
thinner than the strokes left beside it (so the bars of typed 7s lined up in a tight crop stay).
Where a stroke crosses a rule, the pixels the two share are kept, so that the stroke stays
whole.

find_ink (lenet/preprocess.py) calls ``without_rules`` on its ink mask at the working scale.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from lenet.segment import ALL_NEIGHBOURS, grow
from lenet.stats import median, quantiles

# A rule is at most this share of the picture's side thick (and at least 3 pixels may be): at
# the working scale (at most 320 pixels a side) printed lines are 1 to 3 pixels, pen strokes of
# a digit that fills a fifth of the picture 4 or more.
MAX_THICKNESS = 0.02
# A rule reaches both sides of the picture: it is found in the first and the last of the
# strips of this many columns, and in at least MIN_COVER of them (the rest is where strokes
# cross it or run along it).
STRIP = 16
MIN_COVER = 0.4
# ...along a straight line or a gentle curve: no strip's row is farther than this from it.
STRAIGHT_PX = 1.5
# A rule of a page photographed askew may leave the picture through its top or bottom: it
# still runs from one side over at least this share of the strips.
MIN_SPAN = 0.25
# A rule is longer than this many times the tallest piece of ink left beside it.
MIN_LENGTH_TO_INK = 2.0
# Pieces of one rule line up: across a gap of g columns the rows may differ by this many
# pixels plus SLOPE * g (a page photographed up to about 3 degrees askew).
ALIGN_PX = 2.0
SLOPE = 0.06
# ...across at most this many strips (a digit's width at the working scale).
MAX_GAP = 8
# The farthest apart two runs of one rule can be.
REACH = ALIGN_PX + SLOPE * STRIP * MAX_GAP
# A rule is at most this share of the strokes' thickness beside it.
RULE_TO_STROKE = 0.75


class Rules(NamedTuple):
    """The rules of one direction."""

    inside: np.ndarray  # bool: the rules' bands
    crossed: np.ndarray  # bool: the part of the bands a stroke crosses (kept)
    thickness: float  # the thickest rule's, in pixels
    count: int


def without_rules(mask: np.ndarray, ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` (bool, the surely-ink pixels) and ``ink`` (float, ink strength) with ruled
    lines taken out: horizontal ones, vertical ones (squared paper, a margin line), or both.

    Returns the inputs themselves when there is no rule, else new arrays.
    """
    across = _bands(mask)
    down = _bands(mask.T)
    if down is not None:
        down = down._replace(inside=down.inside.T, crossed=down.crossed.T)
    found = [rules for rules in (across, down) if rules is not None]
    if not found:
        return mask, ink
    # The rule must be much longer than the ink beside it is tall (wide, for a vertical one):
    # else the "rule" is a stroke that spans a tight crop (a 7's bar), and it stays.
    rest = mask & ~_taken(found)
    boxes = [b for b in ndimage.find_objects(ndimage.label(rest, ALL_NEIGHBOURS)[0]) if b]
    if not boxes:
        # Nothing beside them: a blank page of lines (they go), or one thin stroke alone, a 1
        # cropped tightly (it stays).
        if sum(rules.count for rules in found) == 1:
            return mask, ink
        return rest, np.zeros_like(ink)
    height, width = mask.shape
    tallest = max(b[0].stop - b[0].start for b in boxes)
    widest = max(b[1].stop - b[1].start for b in boxes)
    # And printed lines are thinner than the strokes left beside them; the bars of typed 7s
    # that line up across a tight crop are as thick as their stems.
    (deep,) = quantiles(ndimage.distance_transform_edt(rest)[rest], (0.9,))
    kept = [
        rules
        for rules, long, ink_side in ((across, width, tallest), (down, height, widest))
        if rules is not None
        and long >= MIN_LENGTH_TO_INK * ink_side
        and rules.thickness <= RULE_TO_STROKE * 2 * deep
    ]
    if not kept:
        return mask, ink
    if len(kept) < len(found):
        rest = mask & ~_taken(kept)
    # The rules' faint anti-aliased edges go too, a pixel either side, or they would come back
    # with the strokes' own (mnist_digit keeps faint ink next to the strokes).
    gone = mask & ~rest
    for rules in kept:
        gone |= grow(rules.inside & ~rules.crossed, 1)
    return rest, np.where(gone & ~rest, np.float32(0.0), ink).astype(ink.dtype, copy=False)


def _taken(found: list[Rules]) -> np.ndarray:
    """The pixels to take out for the rules ``found``: their bands, less where a stroke crosses
    them; where two rules cross each other (squared paper), the "stroke" is the other rule, and
    the pixels go."""
    taken = np.logical_or.reduce([rules.inside for rules in found])
    for rules in found:
        stroke = rules.crossed
        for other in found:
            if other is not rules:
                stroke = stroke & ~other.inside
        taken &= ~stroke
    return taken


def _bands(mask: np.ndarray) -> Rules | None:
    """The horizontal rules of ``mask``; None when there are none."""
    height, width = mask.shape
    # A rule reaches both sides: most pictures have no ink there and end here.
    if width < 2 * STRIP or not (mask[:, :STRIP].any() and mask[:, -STRIP:].any()):
        return None
    thickness = max(3, round(MAX_THICKNESS * height))
    tracks = _tracks(_thin_runs(mask, thickness), width, thickness)
    if not tracks:
        return None
    rows = np.arange(height)[:, None]
    columns = np.arange(width)
    inside = np.zeros_like(mask)
    crossed = np.zeros_like(mask)
    for centre, half in tracks:
        crossing = ~np.isnan(centre)
        centre = np.where(crossing, centre, -height)  # nowhere near a row
        top = np.floor(centre - half).astype(int)
        bottom = np.ceil(centre + half).astype(int)
        # Only the rows the rule runs through (a few, or a few dozen when it is askew).
        lo = max(0, int(top[crossing].min()))
        hi = min(height, int(bottom[crossing].max()) + 1)
        band = (rows[lo:hi] >= top) & (rows[lo:hi] <= bottom)
        # A stroke crosses where there is ink just above and just below the rule (a column
        # either way, for a slanted stroke): those pixels are the stroke's as much as the rule's.
        above = _near(mask[np.clip(top - 1, 0, height - 1), columns] & (top > 0))
        below = _near(mask[np.clip(bottom + 1, 0, height - 1), columns] & (bottom < height - 1))
        inside[lo:hi] |= band
        crossed[lo:hi] |= band & (above & below)
    return Rules(inside, crossed, 2.0 * max(half for _, half in tracks), len(tracks))


def _near(row: np.ndarray) -> np.ndarray:
    """``row`` (bool, one per column) widened by a column either way."""
    out = row.copy()
    out[1:] |= row[:-1]
    out[:-1] |= row[1:]
    return out


def _thin_runs(mask: np.ndarray, thickness: int) -> np.ndarray:
    """The pixels of ``mask`` in vertical runs at most ``thickness`` long: everything a
    horizontal line of that thickness is made of, and none of a stroke crossing it."""
    columns = np.ascontiguousarray(mask.T)  # each column's pixels one after the other
    flat = columns.ravel()
    starts = flat.copy()
    starts[1:] &= ~flat[:-1]
    starts[:: mask.shape[0]] = flat[:: mask.shape[0]]  # a run never continues into a new column
    run = np.cumsum(starts) * flat
    lengths = np.bincount(run)
    thin = flat & (lengths[run] <= thickness)
    return thin.reshape(columns.shape).T


def _tracks(thin: np.ndarray, width: int, thickness: int) -> list[tuple[np.ndarray, float]]:
    """The rules among the thin pieces: for each, its centre row at every column it crosses
    (NaN elsewhere) and half its thickness.

    The picture is cut into strips STRIP columns wide; in each, a rule is a run of rows that
    are mostly thin ink. Strips, not connected pieces: a stroke that touches a rule joins its
    piece, but it spoils only the strips it is in. A rule's runs line up from the first strip
    to the last."""
    height = thin.shape[0]
    count = -(-width // STRIP)
    padded = np.zeros((height, count * STRIP), bool)
    # Row y stands for rows y and y + 1: a thin rule a little askew steps from one row to the
    # next within a strip.
    padded[:-1, :width] = thin[:-1] | thin[1:]
    filled = padded.reshape(height, count, STRIP).sum(axis=2)
    strip_widths = np.full(count, STRIP)
    strip_widths[-1] = width - (count - 1) * STRIP
    ruled = filled >= 0.5 * strip_widths
    middles = np.arange(count) * STRIP + strip_widths / 2.0
    # Chains of runs, left to right: [(strip, centre, thickness), ...]
    chains: list[list[tuple[int, float, int]]] = []
    open_chains: list[list[tuple[int, float, int]]] = []  # those a run may still continue
    for strip in range(count):
        rows = np.flatnonzero(ruled[:, strip])
        if not len(rows):
            continue
        open_chains = [chain for chain in open_chains if strip - chain[-1][0] <= MAX_GAP]
        # The runs' centres in this strip, and where each open chain's end points: the
        # nearest end within reach, among the ends before this strip.
        reachable = sorted((chain[-1][1], k) for k, chain in enumerate(open_chains))
        at_rows = [at for at, _ in reachable]
        for run in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1):
            centre = float(run.mean()) + 0.5
            best, distance = None, None
            low = bisect.bisect_left(at_rows, centre - REACH)
            high = bisect.bisect_right(at_rows, centre + REACH)
            for at, k in reachable[low:high]:
                chain = open_chains[k]
                if chain[-1][0] == strip:  # taken by another run of this strip
                    continue
                off = abs(centre - at)
                if off <= ALIGN_PX + SLOPE * STRIP * (strip - chain[-1][0]):
                    if distance is None or off < distance:
                        best, distance = chain, off
            if best is None:
                best = []
                chains.append(best)
                open_chains.append(best)
            best.append((strip, centre, len(run)))
    tracks = []
    columns = np.arange(width)
    # A rule crosses the picture (its ends may be too faint in the strip at a side, unless the
    # picture has only a few strips), or leaves it through the top or bottom when the page is
    # askew.
    slack = 1 if count > 4 else 0
    for chain in chains:
        first, last = chain[0][0], chain[-1][0]
        span = last - first + 1
        starts, ends = first <= slack, last >= count - 1 - slack
        if not (starts or ends) or span < MIN_SPAN * count or len(chain) < MIN_COVER * span:
            continue
        if not (starts or _at_top_or_bottom(chain[0][1], height, thickness)):
            continue
        if not (ends or _at_top_or_bottom(chain[-1][1], height, thickness)):
            continue
        strips = [strip for strip, _, _ in chain]
        rows = np.array([c for _, c, _ in chain])
        # Printed lines are straight, or bend gently with the page; the bars of a row of
        # handwritten 7s that happen to line up are not (MNIST's wander by 3 pixels and more).
        if len(chain) >= 4:
            fit = np.polyval(np.polyfit(middles[strips], rows, 2), middles[strips])
            if np.abs(rows - fit).max() > STRAIGHT_PX:
                continue
        centres = np.interp(columns, middles[strips], rows)
        within = (columns >= (0 if starts else first * STRIP)) & (
            columns < (width if ends else (last + 1) * STRIP)
        )
        thick = median([float(t) for _, _, t in chain])
        tracks.append((np.where(within, centres, np.nan), thick / 2.0))
    return tracks


def _at_top_or_bottom(centre: float, height: int, thickness: int) -> bool:
    """Whether a rule's end at row ``centre`` is where it leaves the picture."""
    return min(centre, height - 1 - centre) <= thickness + ALIGN_PX
