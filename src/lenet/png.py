"""PNG pixels through libspng when it is installed: the same pixels as Pillow's, sooner.

Decoding is the largest single cost of reading a drawing-page picture (a 280x280 RGBA PNG):
Pillow undoes PNG's row filters one byte at a time, libspng (the `pyspng-seunglab` package,
which the `serve` extra installs) with vector instructions, about twice as fast on these files
(benchmarks/predict_speed.py prints both). Only files whose pixels both read alike come here:
8 bits a sample, grey or RGB with or without alpha, and no chunk that changes what Pillow makes
of the pixels (a palette, tRNS transparency, EXIF orientation). Anything else, and any file
libspng refuses, goes to Pillow as before, so damaged files get Pillow's errors.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 8-bit colour types and the Pillow mode each decodes to: grey, RGB, grey+alpha, RGBA.
MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}
# Chunks that leave the pixels as Pillow reads them (it ignores colour management), besides
# the image data itself. Text chunks are checked for EXIF held as text.
NEUTRAL = {b"IHDR", b"IDAT", b"IEND", b"sRGB", b"gAMA", b"cHRM", b"iCCP", b"pHYs", b"tIME",
           b"bKGD", b"sBIT", b"tEXt", b"zTXt", b"iTXt"}  # fmt: skip
TEXT = {b"tEXt", b"zTXt", b"iTXt"}

_spng: Any = None  # the binding once imported; False when it is not installed


def _binding() -> Any:
    global _spng
    if _spng is None:
        try:
            import pyspng  # the pyspng-seunglab distribution

            _spng = pyspng
        except ImportError:
            _spng = False
    return _spng


def available() -> bool:
    """Whether libspng is installed (else every PNG is decoded by Pillow)."""
    return bool(_binding())


def plain_mode(data: bytes) -> str | None:
    """The Pillow mode of ``data`` when it is a PNG libspng reads exactly as Pillow does, else
    None. Walks the chunk list only (a few dozen chunks at most), not the pixels."""
    if not data.startswith(SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        return None
    depth, colour = data[24], data[25]
    if depth != 8 or colour not in MODES:
        return None
    position = 8
    while position + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        kind = data[position + 4 : position + 8]
        if kind not in NEUTRAL:
            return None
        if kind in TEXT:
            keyword = data[position + 8 : position + 8 + min(length, 80)].split(b"\0", 1)[0]
            if b"exif" in keyword.lower():  # "Raw profile type exif": Pillow reads EXIF there
                return None
        if kind == b"IEND":
            return MODES[colour]
        position += 12 + length
    return None  # no IEND: truncated, Pillow says so


def decode(data: bytes) -> tuple[np.ndarray, str] | None:
    """The pixels of a plain PNG as (H, W) or (H, W, channels) uint8 and their Pillow mode,
    exactly as Pillow decodes them; None when libspng is not installed, the file is not
    plain (see plain_mode) or libspng cannot decode it: then Pillow must."""
    spng = _binding()
    mode = plain_mode(data) if spng else None
    if mode is None:
        return None
    try:
        pixels = spng.load(data)
    except Exception:  # damaged data: Pillow's decoder gives the error the user sees
        return None
    if pixels.dtype != np.uint8 or pixels.ndim != (2 if mode == "L" else 3):
        return None
    return pixels, mode
