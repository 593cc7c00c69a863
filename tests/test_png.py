"""PNGs decoded by libspng give what Pillow gives, and every other PNG still goes to Pillow."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from lenet import png
from lenet.errors import ImageError
from lenet.preprocess import load_picture, preprocess, work_scale

pyspng = pytest.importorskip("pyspng", reason="libspng (pyspng-seunglab, the serve extra)")


def encode(img, **options):
    buffer = io.BytesIO()
    img.save(buffer, "PNG", **options)
    return buffer.getvalue()


def chunk(kind, payload):
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def with_chunk(data, kind, payload):
    """``data`` with a chunk inserted right after IHDR (which ends at byte 33)."""
    return data[:33] + chunk(kind, payload) + data[33:]


@pytest.fixture
def pillow_only(monkeypatch):
    """Decode with Pillow alone, as an install without libspng does: the reference."""

    def decode(data):
        monkeypatch.setattr(png, "_spng", False)
        try:
            return load_picture(data)
        finally:
            monkeypatch.setattr(png, "_spng", None)

    return decode


def written_out(data):
    """The grey picture spelled out with Pillow and the compositing formula (independent of
    lenet's shortcuts): strokes over white paper, or black when they are light."""
    image = Image.open(io.BytesIO(data))
    shrink = int(1.0 / work_scale(*image.size) + 1e-9)
    if shrink >= 2:
        image = image.reduce(shrink)
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if image.mode not in ("LA", "RGBA"):
        return grey
    alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    drawn = alpha > 0.5
    light = drawn.any() and grey[drawn].mean() > 0.5
    return grey * alpha + (0.0 if light else 1.0) * (1.0 - alpha)


def noise(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def canvas_drawing(colour=(0, 0, 0)):
    """A drawing-page export: strokes in alpha, one colour everywhere (black by default)."""
    rgba = np.zeros((280, 280, 4), np.uint8)
    rgba[60:220, 120:150, 3] = 255
    rgba[60:80, 90:150, 3] = 180  # anti-aliased edge values
    rgba[..., :3] = colour
    return Image.fromarray(rgba)


PICTURES = {
    "grey": lambda: Image.fromarray(noise((300, 420))),
    "grey+alpha": lambda: Image.fromarray(noise((300, 420, 2)), "LA"),
    "RGB": lambda: Image.fromarray(noise((300, 420, 3))),
    "RGBA": lambda: Image.fromarray(noise((300, 420, 4))),
    "opaque RGBA": lambda: Image.fromarray(noise((300, 420, 3))).convert("RGBA"),
    "nearly opaque RGBA": lambda: Image.fromarray(
        np.dstack([noise((300, 420, 3)), 250 + noise((300, 420)) % 6])
    ),
    "canvas": canvas_drawing,
    "light strokes on transparency": lambda: canvas_drawing((255, 255, 255)),
    # One channel at a time: the test for black colour must see each of them.
    **{
        f"{name} strokes": lambda i=i: canvas_drawing(np.eye(3, dtype=int)[i] * 200)
        for i, name in enumerate(("red", "green", "blue"))
    },
    # Over twice the working size: reduced by Pillow after decoding, on both paths.
    "large RGBA": lambda: Image.fromarray(noise((1000, 1400, 4))),
    "large grey": lambda: Image.fromarray(noise((1300, 700))),
}


@pytest.mark.parametrize("name", PICTURES)
def test_plain_pngs_read_exactly_as_pillow_reads_them(name, pillow_only):
    data = encode(PICTURES[name]())
    assert png.decode(data) is not None  # this one is libspng's
    fast, reference = load_picture(data), pillow_only(data)
    assert fast.scale == reference.scale
    np.testing.assert_array_equal(fast.grey, reference.grey)
    np.testing.assert_array_equal(fast.grey, written_out(data))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_interlaced_pngs_too(channels, pillow_only):
    # Pillow cannot write Adam7-interlaced files; libspng can, and Pillow reads them.
    pixels = noise((200, 300, channels) if channels > 1 else (200, 300), seed=channels)
    data = pyspng.encode(pixels, progressive=pyspng.ProgressiveMode.INTERLACED)
    assert png.decode(data) is not None
    np.testing.assert_array_equal(load_picture(data).grey, pillow_only(data).grey)


def test_colour_management_chunks_do_not_change_the_pixels(pillow_only):
    data = with_chunk(encode(PICTURES["RGB"]()), b"gAMA", struct.pack(">I", 10_000))
    assert png.plain_mode(data) == "RGB"
    np.testing.assert_array_equal(load_picture(data).grey, pillow_only(data).grey)


def other_pngs():
    grey = Image.fromarray(noise((120, 160)))
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", "exif\n 0\n")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow turns it upright
    rgb = Image.fromarray(noise((120, 160, 3)))
    return {
        "palette": encode(grey.convert("P")),
        "1-bit": encode(grey.convert("1")),
        "16-bit": encode(Image.fromarray(noise((120, 160)).astype(np.uint16) * 257)),
        "tRNS transparency": encode(rgb, transparency=(0, 0, 0)),
        "EXIF orientation": encode(grey, exif=exif),
        "EXIF in a text chunk": encode(grey, pnginfo=text),
        "animated": encode(grey, save_all=True, append_images=[grey.rotate(90)]),
        "no IEND (truncated)": encode(grey)[:-12],
        "not a PNG": b"GIF89a" + bytes(100),
    }


@pytest.mark.parametrize("name", list(other_pngs()))
def test_anything_else_is_left_to_pillow(name, pillow_only):
    data = other_pngs()[name]
    assert png.plain_mode(data) is None
    assert png.decode(data) is None
    if name != "not a PNG" and "truncated" not in name:
        np.testing.assert_array_equal(load_picture(data).grey, pillow_only(data).grey)


def test_exif_orientation_is_still_applied():
    tall = np.zeros((120, 60), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert load_picture(encode(Image.fromarray(tall), exif=exif)).grey.shape == (60, 120)


def test_damaged_data_gets_pillows_error(pillow_only):
    data = bytearray(encode(PICTURES["grey"]()))
    start = data.index(b"IDAT") + 100
    data[start : start + 200] = bytes(200)  # the chunk list is intact, the pixels are not
    assert png.plain_mode(bytes(data)) == "L"
    assert png.decode(bytes(data)) is None
    with pytest.raises(ImageError) as fast:
        load_picture(bytes(data))
    with pytest.raises(ImageError) as reference:
        pillow_only(bytes(data))
    assert str(fast.value) == str(reference.value)


def test_paths_and_file_objects_take_the_same_way(tmp_path, pillow_only):
    data = encode(canvas_drawing())
    (tmp_path / "drawing.png").write_bytes(data)
    expected = pillow_only(data).grey
    for source in (tmp_path / "drawing.png", str(tmp_path / "drawing.png"), io.BytesIO(data)):
        np.testing.assert_array_equal(load_picture(source).grey, expected)
    digit = preprocess(tmp_path / "drawing.png")
    assert digit is not None and digit.image.shape == (28, 28)
