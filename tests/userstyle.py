"""Pictures like users send, built from MNIST *test* digits (never trained on).

Each function returns encoded file bytes: a photo or scan of paper, a canvas export with a
transparent background, or light ink on a dark board, at many sizes and positions.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _stroke(digit: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The digit's ink (float 0..1) scaled to ``size`` pixels tall and rotated a little."""
    img = Image.fromarray(digit.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    img = img.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, expand=True)
    return np.asarray(img, dtype=np.float32) / 255.0


def _place(canvas: np.ndarray, ink: np.ndarray, rng: np.random.Generator) -> None:
    h, w = ink.shape
    y = int(rng.integers(0, canvas.shape[0] - h + 1))
    x = int(rng.integers(0, canvas.shape[1] - w + 1))
    canvas[y : y + h, x : x + w] = np.maximum(canvas[y : y + h, x : x + w], ink)


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _sheet(
    ink: np.ndarray, rng: np.random.Generator, margin: int, extra: tuple[int, int]
) -> np.ndarray:
    """A sheet of random size around ``ink`` (at least ``margin`` bigger), the ink placed on it."""
    h = int(rng.integers(ink.shape[0] + margin, ink.shape[0] + extra[0]))
    w = int(rng.integers(ink.shape[1] + margin, ink.shape[1] + extra[1]))
    layer = np.zeros((h, w), np.float32)
    _place(layer, ink, rng)
    return layer


def paper(digit: np.ndarray, rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    """Dark ink on off-white paper, uneven light, grain, anywhere on a page of random size."""
    size = int(rng.integers(40, 220))
    layer = _sheet(_stroke(digit, size, rng), rng, 4, (300, 400))
    h, w = layer.shape
    page = rng.uniform(0.78, 0.97) - np.linspace(0, rng.uniform(0, 0.18), w)[None, :]
    darkness = rng.uniform(0.55, 0.85)
    grey = page - layer * darkness + rng.normal(0, 0.025, (h, w))
    tint = np.array([1.0, rng.uniform(0.96, 1.0), rng.uniform(0.88, 0.98)])
    rgb = np.clip(grey[..., None] * tint * 255, 0, 255).astype(np.uint8)
    return _encode(Image.fromarray(rgb), fmt, **({"quality": 85} if fmt == "JPEG" else {}))


def faint(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Faint ink: pencil on white paper, or a photo taken in too little light (grey or dark
    paper), the ink 6-20% of the full range darker than the paper, light grain, JPEG. Not among
    STYLES: read less well than those (see the README)."""
    size = int(rng.integers(40, 220))
    layer = _sheet(_stroke(digit, size, rng), rng, 4, (300, 400))
    h, w = layer.shape
    page = rng.uniform(0.2, 0.95) - np.linspace(0, rng.uniform(0, 0.1), w)[None, :]
    grey = page - layer * rng.uniform(0.06, 0.2) + rng.normal(0, rng.uniform(0.005, 0.02), (h, w))
    photo = Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8))
    return _encode(photo, "JPEG", quality=85)


def shadow(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Dark ink on paper photographed in poor light: the shadow of a hand or a phone over part
    of the page, with a soft edge, and the light falling off towards the corners. Paper in the
    shadow is as dark as 40-75% of the lit paper, so no single grey level separates ink from
    paper over the whole picture."""
    size = int(rng.integers(40, 200))
    layer = _sheet(_stroke(digit, size, rng), rng, 4, (300, 400))
    h, w = layer.shape
    y, x = np.mgrid[:h, :w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    across = (x - w / 2) * np.cos(angle) + (y - h / 2) * np.sin(angle)
    edge = float(rng.uniform(-0.3, 0.3)) * min(h, w)
    softness = float(rng.uniform(5, 40))
    shade = float(rng.uniform(0.25, 0.6)) / (1.0 + np.exp(-(across - edge) / softness))
    corners = float(rng.uniform(0, 0.25)) * (((x - w / 2) / w) ** 2 + ((y - h / 2) / h) ** 2) * 2
    light = (1.0 - shade) * (1.0 - corners)
    reflectance = rng.uniform(0.82, 0.95) * (1.0 - layer * rng.uniform(0.7, 0.9))
    grey = reflectance * light + rng.normal(0, 0.015, (h, w))
    photo = Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8))
    return _encode(photo, "JPEG", quality=85)


def page_photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A digit written small on a page photographed whole: a 12-megapixel phone photo (4000x3000
    or 3000x4000), the digit 60 to 160 pixels tall anywhere on it, paper grain, JPEG. Not
    among STYLES: each takes a second or so to build."""
    size = int(rng.integers(60, 161))
    height, width = (3000, 4000) if rng.random() < 0.5 else (4000, 3000)
    layer = np.zeros((height, width), np.float32)
    _place(layer, _stroke(digit, size, rng), rng)
    grain = rng.normal(0, 0.02, (height // 4, width // 4)).astype(np.float32)
    grey = rng.uniform(0.8, 0.95) - layer * rng.uniform(0.6, 0.8)
    grey += np.kron(grain, np.ones((4, 4), np.float32))  # grain a few pixels wide, as a photo's
    photo = Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8))
    return _encode(photo, "JPEG", quality=90)


def canvas(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A drawing app's PNG export: black strokes, transparent background."""
    side = int(rng.integers(200, 500))
    ink = _stroke(digit, int(side * rng.uniform(0.3, 0.7)), rng)
    layer = np.zeros((side, side), np.float32)
    _place(layer, ink, rng)
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[..., 3] = np.clip(layer * 255, 0, 255).astype(np.uint8)
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def board(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Light chalk on a dark board (MNIST's polarity), any size."""
    size = int(rng.integers(30, 150))
    layer = _sheet(_stroke(digit, size, rng), rng, 2, (200, 200))
    h, w = layer.shape
    grey = rng.uniform(0.05, 0.25) + layer * rng.uniform(0.6, 0.9) + rng.normal(0, 0.02, (h, w))
    return _encode(Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8)), "PNG")


def scan(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Dark ink on paper with a dark edge along one to three sides: a scanner's lid, or a desk
    in a corner of a photo. The digit stays clear of the edge (touching it, the two are one
    piece of ink)."""
    size = int(rng.integers(40, 200))
    border = int(rng.integers(6, 30))
    layer = np.pad(_sheet(_stroke(digit, size, rng), rng, 4, (300, 400)), border + 8)
    h, w = layer.shape
    grey = rng.uniform(0.8, 0.97) - layer * rng.uniform(0.55, 0.85) + rng.normal(0, 0.02, (h, w))
    strips = (np.s_[:border], np.s_[-border:], np.s_[:, :border], np.s_[:, -border:])
    for side in rng.choice(4, int(rng.integers(1, 4)), replace=False):
        grey[strips[side]] = rng.uniform(0.02, 0.2)
    return _encode(Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8)), "PNG")


def tight(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A bold digit cropped tightly: dark ink on white with 0 to 6 pixels of paper around it,
    so that the ink covers a third of the picture or more and touches or nearly touches its
    sides. Not among STYLES: read less well than those (see the README)."""
    scale = int(rng.integers(4, 9))
    big = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    ink = np.asarray(big, np.float32) / 255.0
    rows, cols = np.nonzero(ink > 0.3)
    margin = int(rng.integers(0, 7))
    ink = np.pad(ink, margin)[
        rows.min() : rows.max() + 1 + 2 * margin, cols.min() : cols.max() + 1 + 2 * margin
    ]
    grey = np.clip((0.92 - 0.84 * ink) * 255, 0, 255).astype(np.uint8)
    return _encode(Image.fromarray(grey), "PNG")


def _rules(shape: tuple[int, int], spacing: float, thickness: float, angle: float,
           offset: float, across: bool) -> np.ndarray:  # fmt: skip
    """Anti-aliased parallel lines (coverage 0..1), ``spacing`` apart, turned by ``angle``
    radians; ``across``: the lines at right angles to them as well (squared paper)."""
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    along = y * np.cos(angle) - x * np.sin(angle) - offset
    out = np.zeros(shape, np.float32)
    for v in (along, x * np.cos(angle) + y * np.sin(angle) - offset) if across else (along,):
        distance = np.abs((v + spacing / 2) % spacing - spacing / 2)
        out = np.maximum(out, np.clip(thickness / 2 + 0.5 - distance, 0, 1))
    return out


def ruled(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A digit in pen on ruled or squared paper (a notebook), photographed a little askew: the
    printed lines, grey or blue, cross the picture from side to side and the digit sits on them
    or across them; sometimes a red margin line runs down the page."""
    size = int(rng.integers(40, 200))
    layer = _sheet(_stroke(digit, size, rng), rng, 4, (300, 400))
    h, w = layer.shape
    angle = float(np.radians(rng.uniform(-3, 3)))
    lines = _rules(
        (h, w), size * float(rng.uniform(0.6, 1.3)), float(rng.uniform(1, 3)), angle,
        float(rng.uniform(0, 100)), bool(rng.random() < 0.5),
    )  # fmt: skip
    lines *= rng.uniform(0.3, 0.7)  # how dark the print is
    paper_rgb = rng.uniform(0.85, 0.97) * np.array([1.0, 1.0, rng.uniform(0.93, 1.0)])
    line_rgb = rng.choice([[0.35, 0.35, 0.35], [0.35, 0.55, 0.85], [0.45, 0.65, 0.9]])
    ink_rgb = rng.choice([[0.05, 0.05, 0.05], [0.1, 0.12, 0.45]])
    rgb = paper_rgb + rng.normal(0, 0.02, (h, w, 1))
    rgb = rgb * (1 - lines[..., None]) + line_rgb * lines[..., None]
    if rng.random() < 0.3:
        margin = np.zeros((h, w), np.float32)
        margin[:, int(rng.integers(0, w - 2)) :][:, :2] = 0.6
        rgb = rgb * (1 - margin[..., None]) + np.array([0.85, 0.3, 0.3]) * margin[..., None]
    ink = layer[..., None] * rng.uniform(0.7, 0.95)
    rgb = rgb * (1 - ink) + ink_rgb * ink
    img = Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8))
    fmt = "JPEG" if rng.random() < 0.5 else "PNG"
    return _encode(img, fmt, **({"quality": 85} if fmt == "JPEG" else {}))


def _cells(shape: tuple[int, int], centres: list[tuple[float, float]], size: tuple[float, float],
           thickness: float, angle: float) -> np.ndarray:  # fmt: skip
    """Anti-aliased outlines (coverage 0..1) of boxes ``size`` (height, width) around each of
    ``centres`` (y, x), turned by ``angle`` radians; boxes that share a side draw it once."""
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for cy, cx in centres:
        u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        v = (y - cy) * np.cos(angle) - (x - cx) * np.sin(angle)
        distance = np.abs(np.maximum(np.abs(u) - size[1] / 2, np.abs(v) - size[0] / 2))
        out = np.maximum(out, np.clip(thickness / 2 + 0.5 - distance, 0, 1))
    return out


def boxed_number(digits: list[np.ndarray], rng: np.random.Generator) -> bytes:
    """Digits written one to a box, as on a form: a row of boxes sharing their walls or set
    apart, printed in black, grey or a light colour, 1 to 4 pixels thick, the page up to 3
    degrees askew; each digit in the middle of its box, some touching its sides. JPEG."""
    size = int(rng.integers(40, 160))
    cell = (size * rng.uniform(0.75, 1.4), size * rng.uniform(0.7, 1.3))  # (height, width)
    step = cell[1] * (1.0 if rng.random() < 0.5 else rng.uniform(1.05, 1.3))
    angle = float(np.radians(rng.uniform(-3, 3)))
    margin = int(0.4 * size + rng.integers(5, 60))  # the digit, turned and spilling, fits
    h = int(cell[0] + 2 * margin + 0.06 * step * len(digits))
    w = int(step * (len(digits) - 1) + cell[1] + 2 * margin)
    centres = [
        (h / 2 + (k - (len(digits) - 1) / 2) * step * np.sin(angle),
         w / 2 + (k - (len(digits) - 1) / 2) * step * np.cos(angle))
        for k in range(len(digits))
    ]  # fmt: skip
    layer = np.zeros((h, w), np.float32)
    for digit, (cy, cx) in zip(digits, centres):
        ink = _stroke(digit, size, rng)
        top, left = int(cy - ink.shape[0] / 2), int(cx - ink.shape[1] / 2)
        region = layer[top : top + ink.shape[0], left : left + ink.shape[1]]
        np.maximum(region, ink, out=region)
    lines = _cells((h, w), centres, cell, float(rng.uniform(1, max(2, size / 30))), angle)
    print_rgb = rng.choice(
        [[0.1, 0.1, 0.1], [0.45, 0.45, 0.45], [0.45, 0.65, 0.9], [0.9, 0.45, 0.4]]
    )
    paper_rgb = rng.uniform(0.82, 0.97) * np.ones(3)
    rgb = paper_rgb + rng.normal(0, 0.02, (h, w, 1))
    rgb = rgb * (1 - lines[..., None]) + print_rgb * lines[..., None]
    ink = layer[..., None] * rng.uniform(0.7, 0.95)
    rgb = rgb * (1 - ink) + rng.choice([[0.05, 0.05, 0.05], [0.1, 0.12, 0.45]]) * ink
    return _encode(Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8)), "JPEG", quality=85)


def boxed(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A digit written in a box on a form (see ``boxed_number``)."""
    return boxed_number([digit], rng)


STYLES = {
    "paper-jpeg": lambda d, r: paper(d, r, "JPEG"),
    "paper-png": lambda d, r: paper(d, r, "PNG"),
    "canvas": canvas,
    "board": board,
    "scan": scan,
    "ruled": ruled,
    "shadow": shadow,
    "boxed": boxed,
}


def number_line(
    digits: list[np.ndarray], rng: np.random.Generator, touching: bool = False
) -> bytes:
    """Several digits written in a row on paper, with gaps of varying width (or touching)."""
    size = int(rng.integers(50, 120))
    inks = [_stroke(d, size, rng) for d in digits]
    inks = [
        ink[:, np.flatnonzero(ink.max(0) > 0.1).min() : np.flatnonzero(ink.max(0) > 0.1).max() + 1]
        for ink in inks
    ]
    gap = int(size * rng.uniform(0.15, 0.4))
    step = -int(size * 0.04) if touching else gap  # touching: strokes overlap slightly
    width = sum(i.shape[1] for i in inks) + step * (len(inks) - 1) + 2 * gap
    height = max(i.shape[0] for i in inks) + 2 * gap
    layer = np.zeros((height, width), np.float32)
    x = gap
    for ink in inks:
        y = gap + int(rng.integers(0, height - 2 * gap - ink.shape[0] + 1))
        region = layer[y : y + ink.shape[0], x : x + ink.shape[1]]
        np.maximum(region, ink, out=region)
        x += ink.shape[1] + step
    grey = (
        rng.uniform(0.8, 0.95) - layer * rng.uniform(0.6, 0.85) + rng.normal(0, 0.02, layer.shape)
    )
    return _encode(
        Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8)), "JPEG", quality=88
    )


# Pillow's own font is always there; the others come from Debian's fonts-dejavu-core and
# fonts-comic-neue (handwriting-like) where installed.
FONTS = {
    "Pillow's own font": None,
    "DejaVu Sans": "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "DejaVu Serif": "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "DejaVu Sans Bold": "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    **{
        f"Comic Neue {style}": f"/usr/share/fonts/opentype/comic-neue/ComicNeue-{style}.otf"
        for style in ("Regular", "Italic", "Bold", "BoldItalic", "Light", "LightItalic")
    },
}


def typed(digit: int, size: int, font_path: str | None) -> bytes:
    """A digit typed in a font, black on white, ``size`` pixels tall, as PNG."""
    font = (
        ImageFont.load_default(size=size)
        if font_path is None
        else ImageFont.truetype(font_path, size)
    )
    page = Image.new("L", (size * 3, size * 2), 255)
    ImageDraw.Draw(page).text((size * 0.8, size * 0.3), str(digit), font=font, fill=0)
    return _encode(page, "PNG")


def png_claiming(width, height):
    """A tiny PNG whose header claims huge dimensions (an image bomb)."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
