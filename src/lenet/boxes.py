"""Digits written in boxes: the box drawn or printed around a digit (a form's field, a row of
boxes for a number, a square on an exam sheet) is taken out of the ink, so that the digit
inside is read alone.

Without this step a box is the largest piece of ink, and it is read as a 0 (or, with the digit
touching it, as one piece with the digit), or the digit is read with a frame around it. A box
is told from the strokes of a digit by its shape as a whole: four straight sides, each running
along nearly all of one side of the piece's bounding box, thin against the box, and the middle
of the box mostly paper. Few digits have all of that (a typed 0 is round, a 0 written square
has round corners or sides that bend), and a square drawn with a pen is bolder than a printed
box: drawn more boldly than the strokes inside it, or empty and bold, it is a digit and stays
(a 0 written square on the drawing page). Lines that run straight from one side of a box to
the opposite one inside it (the walls between the fields of a row of boxes) go too, when the
fields either side of them are wide enough and one holds ink (a 1 that spans its box stays).
Where a stroke touches or crosses a side or a wall, the pixels the two share are kept, so that
the stroke stays whole.

find_ink (lenet/preprocess.py) calls ``without_boxes`` on its ink mask at the working scale,
after the rules of ruled paper are out (lenet/ruled.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from lenet.segment import ALL_NEIGHBOURS, bounds, grow
from lenet.stats import median, quantiles

# A box at least this many pixels a side (at the working scale, up to 320 pixels a side):
# smaller, its sides are too short to be told from a digit's strokes.
MIN_SIDE = 20
# A side lies along a straight line: this share of its length within STRAIGHT_PX of it (the
# rest is where strokes cross it, or its rounded corners).
MIN_STRAIGHT = 0.85
STRAIGHT_PX = 1.5
# A page photographed askew: up to about 10 degrees.
MAX_SLOPE = 0.18
# A side is a line: at most this share of the box's shorter side thick.
MAX_LINE = 0.15
# Inside the sides, the box is mostly paper (a digit covers a third of its box at most).
MAX_FILLED = 0.5
# A box with less ink than this share of its middle inside is empty, and then it is a form's
# only when its lines are at most PRINTED_LINE of its shorter side thick (a 0 written square
# with a pen is bolder).
MIN_INSIDE = 0.01
PRINTED_LINE = 0.06
# A wall between two fields runs from one side to the opposite one: ink within a pixel of a
# straight line along this share of the way.
WALL_COVER = 0.9
# ... and the fields either side of it are at least this share of the box's height wide (a
# digit's stroke that spans its box, a 7's bar or a 2's base, leaves a narrow one).
WALL_FIELD = 0.3


class Side(NamedTuple):
    """One side of a box, seen as the top of a view of it (``views_of``)."""

    offset: np.ndarray  # float, per column: the row of the line's top edge
    thickness: float
    on_line: np.ndarray  # bool, per column: the ink's top edge is on the line there


class Wall(NamedTuple):
    """A wall between two fields of a row of boxes: where its middle meets the top side and
    the bottom side (columns), and how wide it is (one line, or two side by side)."""

    start: float
    end: float
    width: float

    @property
    def middle(self) -> float:
        """The column of its middle, half-way down."""
        return (self.start + self.end) / 2


# The sides at the start and at the end of each side, in the order its view's columns run.
NEXT_TO = {
    "top": ("left", "right"),
    "bottom": ("left", "right"),
    "left": ("top", "bottom"),
    "right": ("top", "bottom"),
}


def without_boxes(mask: np.ndarray, ink: np.ndarray, faint: float) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` (bool, the surely-ink pixels) and ``ink`` (float, ink strength) with the boxes
    around digits taken out. Returns the inputs themselves when there is no box.

    Boxes are looked for in the ink above ``faint``, a lower level than ``mask``'s: a thin
    printed line, a pixel wide at the working scale, is fainter than pen strokes, and only
    pieces of it are in ``mask``."""
    candidates = mask | (ink > faint)
    if not candidates.any():
        return mask, ink
    # Only the box that holds the candidates is searched: on a clean page that is the digit,
    # a fraction of the picture.
    y0, y1, x0, x1 = bounds(candidates)
    crop = candidates[y0:y1, x0:x1]
    # Pieces up to about 4 pixels apart (what is left of a line at that level) are taken
    # together: the pieces are found at half the resolution (a 2x2 block with ink is ink),
    # grown by a pixel there, which joins them and takes a quarter of the time.
    even = np.zeros((crop.shape[0] + crop.shape[0] % 2, crop.shape[1] + crop.shape[1] % 2), bool)
    even[: crop.shape[0], : crop.shape[1]] = crop
    half = even[::2, ::2] | even[1::2, ::2] | even[::2, 1::2] | even[1::2, 1::2]
    labels, _ = ndimage.label(grow(half, 1), ALL_NEIGHBOURS)
    gone = np.zeros_like(mask)
    for label, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        if 2 * (rows.stop - rows.start) < MIN_SIDE or 2 * (cols.stop - cols.start) < MIN_SIDE:
            continue
        piece = labels[rows, cols] == label
        if not _may_be_box(piece):
            continue
        piece = np.repeat(np.repeat(piece, 2, axis=0), 2, axis=1)
        where = (slice(2 * rows.start, 2 * rows.stop), slice(2 * cols.start, 2 * cols.stop))
        region = piece[: crop[where].shape[0], : crop[where].shape[1]] & crop[where]
        if not region.any():
            continue
        ry0, ry1, rx0, rx1 = bounds(region)
        top, left = y0 + where[0].start + ry0, x0 + where[1].start + rx0
        box = (slice(top, top + ry1 - ry0), slice(left, left + rx1 - rx0))
        lines = _box_lines(region[ry0:ry1, rx0:rx1], mask[box])
        if lines is not None:
            gone[box] |= lines
    if not gone.any():
        return mask, ink
    rest = mask & ~gone
    # The lines' faint anti-aliased edges go too, a pixel either side, or they would come back
    # with the strokes' own (mnist_digit keeps faint ink next to the strokes).
    edges = grow(gone, 1) & ~rest
    return rest, np.where(edges, np.float32(0.0), ink).astype(ink.dtype, copy=False)


def _may_be_box(piece: np.ndarray) -> bool:
    """A quick look at a piece (bool, cut to its bounding box) before the close one: along
    each side, the ink's edge is near the bounding box (within the slope of a box askew) for
    at least 60% of its length. Most digits fail it on the first or second side, in a
    fraction of ``_box_lines``' time."""
    for view in views_of(piece).values():
        near = 1 + MAX_SLOPE * view.shape[1]
        if np.count_nonzero(np.argmax(view, axis=0) <= near) < 0.6 * view.shape[1]:
            return False
    return True


def _box_lines(region: np.ndarray, surely: np.ndarray) -> np.ndarray | None:
    """The pixels of ``region`` (bool, one piece of ink cut to its bounding box) that are its
    box's sides and walls, less those a stroke shares with them; None when it is no box.
    ``surely``: the surely-ink pixels of the same window (the digits inside)."""
    height, width = region.shape
    views = views_of(region)
    # The long sides first; the short ones are then fitted between them only: in a row of
    # boxes a little askew, the bounding box's end holds as much of a long side as of a short.
    long, short = ("top", "bottom"), ("left", "right")
    if height > width:
        long, short = short, long
    sides = {}
    for name in (*long, *short):
        span = (0, None)
        if name in short:
            start, stop = (max(sides[n].offset.max(), 0) for n in long)
            span = (int(np.ceil(start)), len(views[name][0]) - int(np.ceil(stop)))
        side = _top_line(views[name], MAX_LINE * min(height, width), span)
        if side is None:
            return None
        sides[name] = side
    # Each side lies on its line along nearly all of its length between the two sides next to
    # it (beyond them, a box askew has only the corner of another side).
    for name, (before, after) in NEXT_TO.items():
        start = int(np.ceil(max(sides[before].offset.max(), 0)))
        stop = len(sides[name].on_line) - int(np.ceil(max(sides[after].offset.max(), 0)))
        if stop - start < MIN_SIDE or sides[name].on_line[start:stop].mean() < MIN_STRAIGHT:
            return None
    # The middle, inside the sides' lines, is mostly paper.
    top, bottom, left, right = (
        int(np.ceil(max(sides[n].offset.max(), 0) + sides[n].thickness)) + 1
        for n in ("top", "bottom", "left", "right")
    )
    middle = (slice(top, height - bottom), slice(left, width - right))
    if region[middle].size == 0 or region[middle].mean() > MAX_FILLED:
        return None
    bands = np.zeros_like(region)
    band_views = views_of(bands)
    for name, side in sides.items():
        _band(band_views[name], side.offset, side.thickness)
    walls = _walls(region, bands, sides, surely)
    walls |= _walls(region.T, bands.T, _turned(sides), surely.T).T
    bands |= walls
    # A box drawn more boldly than the strokes inside it (by more than a pixel), or empty and
    # bold, is itself a digit: a 0 written square (on the drawing page, with its thick pen;
    # slashed, or not). A form's box is printed or ruled, no bolder than the writing in it.
    thickness = max(side.thickness for side in sides.values())
    inside = surely[middle] & ~bands[middle]
    if inside.sum() < max(6.0, MIN_INSIDE * inside.size):
        if thickness > PRINTED_LINE * min(height, width):
            return None
    elif thickness > _stroke_width(inside) + 1.0:
        return None
    # Where a stroke touches a side from inside (or crosses it), the band's pixels in that
    # column are the stroke's end as much as the side's: they stay.
    strokes = region & ~bands
    shared = np.zeros_like(region)
    stroke_views, shared_views = views_of(strokes), views_of(shared)
    for name, side in sides.items():
        _touched(stroke_views[name], shared_views[name], side.offset, side.thickness)
    lines = region & bands & ~(shared & ~walls)
    # What is kept of a side must be part of a stroke: a stroke that touches a side only at
    # the faint level (a pixel of paper between them in ``surely``) leaves the side's piece
    # alone, and alone it is read as a 1.
    stays = surely & ~lines
    labels, _ = ndimage.label(stays, ALL_NEIGHBOURS)
    attached = np.unique(labels[surely & ~bands])
    orphans = stays & bands & ~np.isin(labels, attached)
    return lines | orphans


def _stroke_width(ink: np.ndarray) -> float:
    """The typical width of the strokes in ``ink`` (bool): twice the distance from the paper
    that 90% of the ink is within (a stroke's middle is half its width from either edge, in
    any direction it runs)."""
    (deep,) = quantiles(ndimage.distance_transform_edt(np.pad(ink, 1))[1:-1, 1:-1][ink], (0.9,))
    return 2.0 * deep


def views_of(array: np.ndarray) -> dict[str, np.ndarray]:
    """Views of ``array`` (writable) with each of its sides as the top: a flip or a transpose."""
    return {"top": array, "bottom": array[::-1], "left": array.T, "right": array[:, ::-1].T}


def _turned(sides: dict) -> dict:
    """The sides of a box seen transposed: top and left swap, bottom and right."""
    swap = {"top": "left", "left": "top", "bottom": "right", "right": "bottom"}
    return {swap[name]: side for name, side in sides.items()}


def _top_line(
    view: np.ndarray, max_thickness: float, span: tuple[int, int | None] = (0, None)
) -> Side | None:
    """The straight line along the top of ``view`` (a robust fit to the top edge of its ink,
    column by column, within the columns of ``span``) and where the edge lies on it; None
    when the edge is too steep or too thick for a box's side."""
    height, width = view.shape
    columns = np.arange(width)
    within = np.zeros(width, bool)
    within[slice(*span)] = True
    present = view.any(axis=0) & within
    first = np.argmax(view, axis=0)
    if within.sum() < MIN_SIDE or present.sum() < MIN_STRAIGHT * within.sum():
        return None
    xs, ys = columns[present], first[present].astype(np.float64)
    # A robust line: the median slope between the points of the left and the right half,
    # paired in order, and the median intercept; strokes crossing the side pull it nowhere.
    half = len(xs) // 2
    slope = median((ys[half : 2 * half] - ys[:half]) / (xs[half : 2 * half] - xs[:half]))
    if abs(slope) > MAX_SLOPE:
        return None
    offset = median(ys - slope * xs) + slope * columns
    on_line = present & (np.abs(first - offset) <= STRAIGHT_PX)
    # (The exact share is checked in _box_lines, once every side's span is known; most
    # pieces of ink, the digits themselves, are far from it and end here.)
    if on_line.sum() < (MIN_STRAIGHT - 0.1) * within.sum():
        return None
    # Thickness: how far the ink runs down from the top edge, along the columns on the line
    # (the median: where a stroke leaves the side, it runs on).
    depth = np.zeros(width, int)
    running = present.copy()
    for k in range(int(max_thickness) + 2):
        row = np.clip(first + k, 0, height - 1)
        running &= view[row, columns] & (first + k < height)
        depth += running
    thickness = median(depth[on_line].astype(np.float32))
    if thickness > max_thickness:
        return None
    return Side(offset, thickness, on_line)


def _band(view: np.ndarray, offset: np.ndarray, thickness: float) -> None:
    """Marks in ``view`` the band of the line along its top: from the row ``offset`` gives
    (per column) down through ``thickness`` rows, a pixel more either way for a line that
    steps from one row to the next."""
    rows = np.arange(view.shape[0])[:, None]
    top = np.floor(offset) - 1
    bottom = np.ceil(offset + thickness)
    view |= (rows >= top) & (rows <= bottom)


def _touched(strokes: np.ndarray, shared: np.ndarray, offset: np.ndarray, thickness: float) -> None:
    """Marks in ``shared`` the columns of the top band that a stroke below it touches: ink
    of ``strokes`` within two rows under the band (a column either way)."""
    height, width = strokes.shape
    columns = np.arange(width)
    bottom = np.ceil(offset + thickness).astype(int)
    touch = np.zeros(width, bool)
    for k in (1, 2):
        row = bottom + k
        inside = row < height
        touch[inside] |= strokes[row[inside], columns[inside]]
    near = grow(touch[None, :], 1)[0]  # a column either way
    rows = np.arange(height)[:, None]
    shared |= near[None, :] & (rows >= np.floor(offset) - 1) & (rows <= bottom)


def _walls(region: np.ndarray, bands: np.ndarray, sides: dict, surely: np.ndarray) -> np.ndarray:
    """The walls of ``region``'s box that run from its top side to its bottom side (between
    the fields of a row of boxes): straight lines of ink, no thicker than the box's left and
    right sides (or two such lines side by side: boxes set a hair apart), along WALL_COVER of
    the way between the two sides, that leave fields at least WALL_FIELD of the box's height
    wide on either side, one of them with ink (``surely``) in it. A stroke that fills its box
    from side to side (a 1, a 7's bar, a 2's base) leaves a narrow field, or two empty ones,
    and stays."""
    height, width = region.shape
    walls = np.zeros_like(region)
    top, bottom = sides["top"], sides["bottom"]
    y0 = int(np.ceil(top.offset.max() + top.thickness)) + 2
    y1 = height - int(np.ceil(bottom.offset.max() + bottom.thickness)) - 2
    if y1 - y0 < MIN_SIDE // 2:
        return walls
    thickness = max(sides["left"].thickness, sides["right"].thickness)
    strokes = region & ~bands
    inner = strokes[y0:y1]
    left_end, right_end = _run_bounds(inner)
    holes = None  # (_holes, made when first needed)
    # Where a wall meets the top and the bottom side: ink just inside each of them, in runs
    # no longer than a wall with a digit touching it (a longer run is a line along the side:
    # a grid's, or hatching; trying every column of it took seconds).
    longest = 3 * (thickness + 2)
    starts = [x for x in np.flatnonzero(inner[0]) if right_end[0, x] - left_end[0, x] <= longest]
    ends = np.array(
        [x for x in np.flatnonzero(inner[-1]) if right_end[-1, x] - left_end[-1, x] <= longest]
    )
    if not starts or not len(ends):
        return walls
    # Two walls (boxes set apart) to a field at most, a field MIN_SIDE wide at least: more
    # is a grid or hatching, no row of boxes for digits.
    if np.count_nonzero(np.diff(starts) > 1) + 1 > 2 * width / MIN_SIDE:
        return walls
    rows = np.arange(y1 - y0)
    reach = int(np.ceil(MAX_SLOPE * (y1 - y0)))
    candidates: list[Wall] = []
    for start in starts:
        if any(abs(start - wall.start) <= thickness / 2 + 0.5 for wall in candidates):
            continue  # on a wall already found
        best, best_cover = None, WALL_COVER
        for end in ends[np.abs(ends - start) <= reach]:
            path = np.round(start + (end - start) * rows / max(len(rows) - 1, 1)).astype(int)
            # The run of ink at the path, or a column either side of it, row by row.
            at = np.full(len(rows), -1)
            for dx in (1, -1, 0):
                column = np.clip(path + dx, 0, width - 1)
                at = np.where(inner[rows, column], column, at)
            near = at >= 0
            if near.mean() < best_cover:
                continue
            lo, hi = left_end[rows[near], at[near]], right_end[rows[near], at[near]]
            # As thin as the box's other lines, and straight: its middle lies along the path,
            # or a little to one side of it all the way (the path may run along one edge of
            # the wall); a path from one wall to the one next to it does not.
            wide = median((hi - lo).astype(np.float32))
            if wide > thickness + 1.5:
                # Wider than a line: two lines side by side, with paper between them in half
                # the rows at least, or no wall.
                if holes is None:
                    holes = _holes(inner, surely[y0:y1], left_end, right_end)
                between = holes[rows[near], hi] - holes[rows[near], lo]
                if wide > 2 * thickness + 2.5 or np.mean(between > 0) < 0.5:
                    continue
            off = (lo + hi - 1) / 2 - path[near]
            shift = median(off.astype(np.float32))
            if np.mean(np.abs(off - shift) <= 1.0) >= WALL_COVER:
                best = Wall(start + shift, end + shift, max(float(wide), thickness))
                best_cover = near.mean()
        if best is not None:
            candidates.append(best)
    if not candidates:
        return walls
    # The walls' fields: walls closer than a field's width are one boundary (the two sides of
    # boxes set a little apart).
    field = WALL_FIELD * (y1 - y0)
    candidates.sort(key=lambda wall: wall.middle)
    groups: list[list[Wall]] = []
    for wall in candidates:
        if groups and wall.middle - groups[-1][-1].middle < field:
            groups[-1].append(wall)
        else:
            groups.append([wall])
    limits = [0.0] + [x for g in groups for x in (g[0].middle, g[-1].middle)]
    limits.append(float(width))
    every = np.arange(height)
    columns = np.arange(width)[None, :]
    kept = []
    for k, group in enumerate(groups):
        before, first, last, after = limits[2 * k : 2 * k + 4]
        if first - before < field or after - last < field:
            continue
        # (Off the wall by a stroke's width and more: a 1 written slanting reaches out.)
        margin = 2 * thickness + 3
        inked = [
            np.count_nonzero(surely[y0:y1, int(a) : int(b)] & ~bands[y0:y1, int(a) : int(b)])
            for a, b in ((before, first - margin), (last + margin + 1, after))
        ]
        if max(inked) < max(6.0, 0.02 * field * (y1 - y0)):
            continue
        for start, end, wide in group:
            # The whole height, through the top and bottom sides' bands too: nothing of the
            # wall is left where it meets them.
            centre = start + (end - start) * (every - y0) / max(len(rows) - 1, 1)
            half = wide / 2
            lo = np.floor(centre - half - 1).astype(int)
            hi = np.ceil(centre + half + 1).astype(int)
            kept.append((lo, hi))
            walls |= (columns >= lo[:, None]) & (columns <= hi[:, None])
    # Where a stroke crosses a wall (ink just left and just right of it, that of no other
    # wall), the pixels are the stroke's as much as the wall's: they stay.
    strokes &= ~walls
    for lo, hi in kept:
        crossed = _beside(strokes, every, lo - 1, -1) & _beside(strokes, every, hi + 1, 1)
        walls[crossed] &= ~((columns[0] >= lo[crossed, None]) & (columns[0] <= hi[crossed, None]))
    return walls


def _holes(inner: np.ndarray, surely: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row of ``inner``, the running count (a zero column first, so that the count in
    columns a:b is ``out[:, b] - out[:, a]``) of its pixels that are paper in ``surely``
    between two surely-ink pixels of the same run (``lo``, ``hi``: _run_bounds of ``inner``):
    where a run at the faint level is two lines side by side, the sides of two boxes set a
    hair apart. A stroke (a 1 along a wall) is solid ink and has none."""
    ink = surely & inner
    hole = inner & ~ink & (_last_marked(ink) >= lo) & (_first_marked(ink) < hi)
    out = np.zeros((inner.shape[0], inner.shape[1] + 1), np.int32)
    np.cumsum(hole, axis=1, out=out[:, 1:])
    return out


def _run_bounds(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel of ``ink`` (bool), where the run of ink along its row starts and ends
    (end exclusive); meaningless off the ink."""
    starts = ink.copy()
    starts[:, 1:] &= ~ink[:, :-1]
    stops = ink.copy()
    stops[:, :-1] &= ~ink[:, 1:]
    return _last_marked(starts), _first_marked(stops) + 1


def _last_marked(marks: np.ndarray) -> np.ndarray:
    """Per pixel, the column of the last pixel of ``marks`` (bool) in its row at or before
    it; -1 where there is none."""
    index = np.arange(marks.shape[1])
    return np.maximum.accumulate(np.where(marks, index, -1), axis=1)


def _first_marked(marks: np.ndarray) -> np.ndarray:
    """Per pixel, the column of the first pixel of ``marks`` (bool) in its row at or after
    it; the row's width where there is none."""
    width = marks.shape[1]
    index = np.arange(width)
    return np.minimum.accumulate(np.where(marks, index, width)[:, ::-1], axis=1)[:, ::-1]


def _beside(strokes: np.ndarray, rows: np.ndarray, columns: np.ndarray, step: int) -> np.ndarray:
    """Per row, whether ``strokes`` has ink at the given column or the next one ``step`` on."""
    width = strokes.shape[1]
    out = np.zeros(len(rows), bool)
    for column in (columns, columns + step):
        inside = (column >= 0) & (column < width)
        out[inside] |= strokes[rows[inside], column[inside]]
    return out
