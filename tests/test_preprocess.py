"""Preprocessing: any picture of a digit becomes an MNIST-style 28x28, the same way."""

import io
import os

import numpy as np
import pytest
import userstyle
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from scipy import ndimage

from lenet.boxes import without_boxes
from lenet.errors import ImageError, ImageTooLarge, UnsupportedImageFormat
from lenet.preprocess import WORK_MAX_SIDE, WORK_MIN_SIDE, preprocess, work_scale
from lenet.ruled import without_rules


def encode(img, fmt="PNG", **options):
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.test.images[:200, 0].numpy(), mnist.test.labels[:200].numpy()


def on_paper(digit, size=120, canvas=(200, 260), at=(40, 60)):
    """Black ink on white paper (RGB), the digit scaled to ``size`` pixels."""
    ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC))
    page = np.full(canvas, 255, np.uint8)
    y, x = at
    page[y : y + size, x : x + size] = 255 - ink
    return Image.fromarray(page).convert("RGB")


def similar(a, b, tolerance=12.0):
    return np.abs(a.astype(float) - b.astype(float)).mean() < tolerance


def test_an_mnist_digit_goes_through_unchanged_in_effect(digits):
    images, _ = digits
    diffs = [np.abs(preprocess(x).image.astype(int) - x.astype(int)).mean() for x in images]
    assert np.mean(diffs) < 2.0  # out of 255
    assert np.median(diffs) < 1.0


def test_output_shape_range_and_centre_of_mass(digits):
    images, _ = digits
    for digit in images[:30]:
        out = preprocess(encode(on_paper(digit))).image
        assert out.shape == (28, 28) and out.dtype == np.uint8 and out.max() > 200
        cy, cx = ndimage.center_of_mass(out.astype(float))
        assert abs(cy - 14) <= 0.75 and abs(cx - 14) <= 0.75
        ys, xs = np.nonzero(out > 30)
        assert max(np.ptp(ys), np.ptp(xs)) <= 21  # fitted in the 20x20 box


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(24, 200),
    dy=st.integers(0, 200),
    dx=st.integers(0, 200),
    pad=st.integers(0, 150),
    invert=st.booleans(),
)
def test_translating_scaling_padding_or_inverting_changes_nothing_much(
    digits, size, dy, dx, pad, invert
):
    digit = digits[0][3]
    reference = preprocess(digit).image
    picture = on_paper(digit, size, (size + dy + pad + 1, size + dx + pad + 1), (dy, dx))
    picture = picture.convert("L")
    if invert:
        picture = Image.eval(picture, lambda v: 255 - v)
    assert similar(preprocess(encode(picture)).image, reference, tolerance=20)


def test_transparent_canvas_is_paper_not_a_black_square(digits):
    digit = digits[0][0]
    rgba = np.zeros((280, 280, 4), np.uint8)
    ink = np.asarray(Image.fromarray(digit).resize((200, 200)))
    rgba[40:240, 40:240, 3] = ink  # black strokes, alpha = ink
    from_canvas = preprocess(encode(Image.fromarray(rgba, "RGBA"))).image
    from_paper = preprocess(encode(on_paper(digit, 200, (280, 280), (40, 40)))).image
    assert similar(from_canvas, from_paper, tolerance=8)


def test_exif_rotated_jpeg_is_read_upright(digits):
    digit = digits[0][1]
    upright = on_paper(digit)
    # Stored rotated, with the EXIF tag that tells viewers to turn it back (orientation 6).
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    assert similar(preprocess(data).image, preprocess(encode(upright, "JPEG", quality=95)).image)


def test_16_bit_png_is_scaled_not_clipped(digits):
    picture = np.asarray(on_paper(digits[0][2]).convert("L")).astype(np.uint16) * 257
    data = encode(Image.fromarray(picture))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert similar(preprocess(data).image, preprocess(encode(on_paper(digits[0][2]))).image, 2)


def test_10_12_and_14_bit_values_in_16_bit_files_and_arrays_are_read(digits):
    # Scanners and cameras store fewer bits in 16-bit files; read against 65535, a 12-bit
    # picture's paper was a sixteenth of white, and its digit "no digit found".
    eight = np.asarray(on_paper(digits[0][2]).convert("L")).astype(np.uint16)
    reference = preprocess(encode(on_paper(digits[0][2]))).image
    for bits in (10, 12, 14):
        deep = eight * ((2**bits - 1) / 255)
        for source in (encode(Image.fromarray(deep.astype(np.uint16))), deep.astype(np.uint16)):
            found = preprocess(source)
            assert found is not None and similar(found.image, reference, 3), bits


def test_palette_and_cmyk_images(digits):
    paper = on_paper(digits[0][4])
    reference = preprocess(encode(paper)).image
    assert similar(preprocess(encode(paper.convert("P"))).image, reference, 6)
    assert similar(preprocess(encode(paper.convert("CMYK"), "JPEG", quality=95)).image, reference)


@pytest.mark.parametrize("kind", ["white", "grey", "black", "noise", "gradient", "1x1"])
def test_no_ink_means_no_digit(kind):
    rng = np.random.default_rng(0)
    pictures = {
        "white": np.full((200, 200), 255, np.uint8),
        "grey": np.full((64, 90), 128, np.uint8),
        "black": np.zeros((300, 100), np.uint8),
        "noise": rng.integers(0, 256, (240, 320), dtype=np.uint8),
        "gradient": np.tile(np.linspace(60, 230, 300), (200, 1)).astype(np.uint8),
        "1x1": np.zeros((1, 1), np.uint8),
    }
    assert preprocess(encode(Image.fromarray(pictures[kind]))) is None


def test_every_input_type_gives_the_same_answer(tmp_path, digits):
    paper = on_paper(digits[0][5])
    path = tmp_path / "digit.png"
    paper.save(path)
    expected = preprocess(path).image
    for source in (str(path), path.read_bytes(), open(path, "rb"), paper, np.asarray(paper)):
        assert np.array_equal(preprocess(source).image, expected)


def test_animated_gif_uses_the_first_frame(digits):
    first, second = on_paper(digits[0][6]).convert("L"), on_paper(digits[0][7]).convert("L")
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second])
    assert similar(preprocess(buffer.getvalue()).image, preprocess(encode(first)).image, 4)


def test_bad_files_give_clear_errors(tmp_path):
    png = encode(Image.new("L", (50, 50), 255))
    jpeg = encode(Image.new("RGB", (50, 50), "white"), "JPEG")
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    cases = [
        (b"", ImageError, "empty"),
        (png[: len(png) // 2], ImageError, "damaged or truncated"),
        (jpeg[:200], ImageError, "damaged or truncated"),
        (text, ImageError, "not an image"),
        # Pillow's own guard meets it first: one limit in the message, lenet's.
        (
            userstyle.png_claiming(100_000, 100_000),
            ImageTooLarge,
            r"limit of 40,000,000 pixels lenet decodes \(it has 10,000,000,000\)\. Scale",
        ),
        (userstyle.png_claiming(8_000, 8_000), ImageTooLarge, "64,000,000 pixels, over the limit"),
        (encode(Image.new("L", (20, 20)), "PPM"), UnsupportedImageFormat, "PPM images"),
        (tmp_path / "missing.png", ImageError, "no such file"),
        # Formats Pillow cannot even identify, refused as formats (415), not as damaged.
        (b"%PDF-1.7\n1 0 obj <<>> endobj", UnsupportedImageFormat, "PDF files are not"),
        (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
            UnsupportedImageFormat,
            "SVG",
        ),
        (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64), UnsupportedImageFormat, "HEIC"),
        (12, ImageError, "from an int"),
    ]
    for source, error, words in cases:
        with pytest.raises(error, match=words):
            preprocess(source)
    svg = tmp_path / "digit.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><path d="M5 5v20"/></svg>')
    with pytest.raises(UnsupportedImageFormat, match="SVG files are not accepted"):
        preprocess(svg)
    # A file opened in text mode fails on the picture's first bytes; a closed one cannot be read.
    picture = tmp_path / "digit.png"
    picture.write_bytes(png)
    with open(picture) as text_mode, pytest.raises(ImageError, match="mode 'rb'"):
        preprocess(text_mode)
    with open(picture, "rb") as closed:
        pass
    with pytest.raises(ImageError, match="cannot be read .*closed"):
        preprocess(closed)
    assert ImageTooLarge.status == 413 and UnsupportedImageFormat.status == 415


def test_a_scanners_black_edge_and_a_dark_desk_are_not_ink(digits):
    digit = digits[0][8]
    reference = preprocess(encode(on_paper(digit))).image
    framed = np.asarray(on_paper(digit).convert("L")).copy()
    framed[:4, :] = framed[-4:, :] = framed[:, :4] = framed[:, -4:] = 0
    assert similar(preprocess(framed).image, reference)
    desk = np.full((250, 320), 25, np.uint8)  # the paper photographed on a dark desk
    desk[20:220, 40:300] = np.asarray(on_paper(digit).convert("L"))
    assert similar(preprocess(desk).image, reference)


def test_a_dark_edge_along_two_or_three_sides_is_not_ink(digits):
    # A scanner's or a photo's dark edge along two sides (an L, which encloses nothing) or
    # three: left out as a border, as one along one side or all four is.
    strips = {
        "top": np.s_[:14],
        "bottom": np.s_[-14:],
        "left": np.s_[:, :14],
        "right": np.s_[:, -14:],
    }
    for index in (8, 3, 7):
        page = np.asarray(on_paper(digits[0][index]).convert("L")).copy()
        clean = preprocess(page.copy())
        for sides in (("left", "bottom"), ("top", "right"), ("left", "top", "right")):
            edged = page.copy()
            for side in sides:
                edged[strips[side]] = 20
            found = preprocess(edged)
            assert similar(found.image, clean.image), (index, sides)
            assert np.abs(np.subtract(found.box, clean.box)).max() <= 2, (index, sides)
    # A tightly cropped 7 whose bar runs along the whole top is still a 7, bar and all.
    seven = digits[0][int(np.flatnonzero(digits[1] == 7)[0])]
    rows, cols = np.nonzero(seven > 60)
    tight = 255 - seven[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    tight = np.asarray(Image.fromarray(tight).resize((tight.shape[1] * 8, tight.shape[0] * 8)))
    found = preprocess(tight)
    assert found.box == (0, 0, tight.shape[1], tight.shape[0])


def ruled_page(page: np.ndarray, rows=(), columns=(), darkness=110, thickness=2):
    """``page`` (grey, dark ink on white) with printed lines drawn under the ink."""
    lines = np.zeros(page.shape, bool)
    for y in rows:
        lines[y : y + thickness] = True
    for x in columns:
        lines[:, x : x + thickness] = True
    return np.where(lines, np.minimum(page, 255 - darkness), page).astype(np.uint8)


def test_the_lines_of_ruled_and_squared_paper_are_not_ink(digits):
    # A digit written on a notebook's lines, or across them, is one piece of ink with them:
    # it was left out with the lines as a frame (no digit) or read with a bar through it.
    images, labels = digits
    for index in (0, 1, 3, 8, 11):
        page = np.asarray(on_paper(images[index], 100, (240, 320), (70, 110)).convert("L"))
        clean = preprocess(page.copy())
        # Lines every 45 pixels (two through the digit), then squared paper, then a page
        # photographed 2 degrees askew.
        lined = ruled_page(page, rows=range(10, 240, 45))
        squared = ruled_page(page, rows=range(10, 240, 45), columns=range(20, 320, 45))
        askew = np.asarray(
            Image.fromarray(lined).rotate(2, Image.Resampling.BILINEAR, fillcolor=255)
        )[10:-10, 10:-10]
        for name, picture in (("lined", lined), ("squared", squared), ("askew", askew)):
            found = preprocess(picture)
            assert found is not None, (index, name)
            assert similar(found.image, clean.image, 15), (index, name)
            if name != "askew":  # (turned, the digit is elsewhere)
                assert np.abs(np.subtract(found.box, clean.box)).max() <= 2, (index, name)
            assert found.box[2] - found.box[0] < 110 and found.box[3] - found.box[1] < 110
    # Lines alone are no digit.
    blank = ruled_page(np.full((240, 320), 250, np.uint8), range(10, 240, 45), range(20, 320, 45))
    assert preprocess(blank) is None


def boxed_page(page: np.ndarray, box: tuple[int, int, int, int], grey=40, width=2, angle=0.0):
    """``page`` (grey, dark ink on white) with a box (x0, y0, x1, y1) drawn around the ink,
    then the whole page turned by ``angle`` degrees."""
    picture = Image.fromarray(page)
    ImageDraw.Draw(picture).rectangle(box, outline=grey, width=width)
    return np.asarray(picture.rotate(angle, Image.Resampling.BILINEAR, fillcolor=255))


def test_the_box_around_a_digit_is_not_ink(digits):
    # A digit written in a form's box: the box was the largest piece of ink (read as a 0), or
    # one piece with a digit touching it.
    images, labels = digits
    for index in (0, 1, 3, 8, 11):
        page = np.asarray(on_paper(images[index], 100, (240, 320), (70, 110)).convert("L"))
        clean = preprocess(page.copy())
        x0, y0, x1, y1 = clean.box
        cases = {
            "clear": boxed_page(page, (x0 - 25, y0 - 20, x1 + 25, y1 + 20)),
            "grey, thin": boxed_page(page, (x0 - 15, y0 - 15, x1 + 15, y1 + 15), 150, 1),
            # The digit's ink runs into the box's sides (and past them).
            "touching": boxed_page(page, (x0 + 3, y0 + 3, x1 - 3, y1 - 3)),
        }
        for name, picture in cases.items():
            found = preprocess(picture)
            assert found is not None, (index, name)
            assert similar(found.image, clean.image, 15 if name != "touching" else 25), (
                index,
                name,
            )
            assert np.abs(np.subtract(found.box, clean.box)).max() <= 4, (index, name)
        # A page photographed askew: the digit is elsewhere, but read the same.
        askew = boxed_page(page, (x0 - 20, y0 - 20, x1 + 20, y1 + 20), angle=3)
        found = preprocess(askew)
        assert similar(found.image, clean.image, 15), index
        assert found.box[2] - found.box[0] < x1 - x0 + 12, index
    # A box alone is no digit; a row of boxes neither.
    blank = np.full((240, 320), 250, np.uint8)
    assert preprocess(boxed_page(blank, (100, 60, 200, 170))) is None
    row = Image.fromarray(blank)
    for k in range(4):
        ImageDraw.Draw(row).rectangle((40 + 60 * k, 80, 100 + 60 * k, 150), outline=30, width=2)
    assert preprocess(np.asarray(row)) is None


def test_boxes_set_a_hair_apart_and_strokes_that_near_a_side(digits):
    # Ink strength as find_ink hands it over: the printed lines 0.8, the pen 0.9, and faint
    # ink (0.2: under the threshold of 0.35, over the box search's 0.1) where JPEG and the
    # shrinking to the working size blur two lines, or a line and a stroke, together.
    def ink_of(draw_on) -> tuple[np.ndarray, np.ndarray]:
        page = Image.new("L", (300, 140), 0)
        draw_on(ImageDraw.Draw(page))
        ink = np.asarray(page, np.float32) / 255
        return ink > 0.35, ink

    # Two boxes whose sides are a hair apart (columns 118-119 and 122-123, faint between):
    # at the faint level the two sides are one wall, twice a line's width; it goes.
    def two_boxes(draw: ImageDraw.ImageDraw) -> None:
        draw.rectangle((120, 20, 121, 119), fill=51)
        draw.rectangle((20, 20, 119, 119), outline=204, width=2)
        draw.rectangle((122, 20, 221, 119), outline=204, width=2)
        for x in (45, 147):
            draw.ellipse((x, 40, x + 50, 100), outline=230, width=5)

    mask, ink = ink_of(two_boxes)
    kept, _ = without_boxes(mask, ink, 0.1)
    assert not kept[25:115, 112:130].any()  # the double wall
    assert kept[40:101, 45:96].sum() == mask[40:101, 45:96].sum()  # the digits stay
    assert kept[40:101, 147:198].sum() == mask[40:101, 147:198].sum()
    assert not kept[:, :30].any() and not kept[:, 212:].any()

    # A round stroke that nears the box's left side with only faint ink between: what would
    # be kept of the side where a stroke meets it is no part of the stroke, and alone it was
    # read as a 1 (a 0 in the first of a row of boxes read as "10").
    def near_the_side(draw: ImageDraw.ImageDraw) -> None:
        draw.rectangle((22, 50, 23, 90), fill=51)
        draw.rectangle((20, 20, 121, 119), outline=204, width=2)
        draw.ellipse((24, 35, 84, 105), outline=230, width=5)

    mask, ink = ink_of(near_the_side)
    kept, _ = without_boxes(mask, ink, 0.1)
    assert not kept[:, :24].any()
    assert kept[35:106, 24:85].sum() == mask[35:106, 24:85].sum()


def test_digits_are_not_taken_for_boxes(digits):
    # No MNIST digit has four straight sides: cropped tightly (its strokes along the crop's
    # edges, as a box's are), each is left whole.
    images, labels = digits
    for digit in range(10):
        image = images[int(np.flatnonzero(labels == digit)[0])]
        big = np.asarray(Image.fromarray(image).resize((112, 112), Image.Resampling.BILINEAR))
        mask = big > 100
        rows, cols = np.nonzero(mask)
        tight = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert without_boxes(tight, tight.astype(np.float32), 0.5)[0] is tight, digit
    # A 0 written square on the drawing page (its pen is 20 units of 280): four straight
    # sides and nothing inside, but drawn as boldly as a digit, not printed as a form's box.
    # Slashed, the slash is no digit in a box either: box and slash are drawn alike.
    for width, height, slashed in ((100, 150, False), (180, 240, False), (250, 260, True)):
        canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
        x0, y0 = (280 - width) // 2, (280 - height) // 2
        draw = ImageDraw.Draw(canvas)
        draw.rounded_rectangle(
            (x0, y0, x0 + width, y0 + height), radius=10, outline=(0, 0, 0, 255), width=20
        )
        if slashed:
            draw.line((x0 + 40, y0 + height - 40, x0 + width - 40, y0 + 40), "black", 20)
        found = preprocess(encode(canvas))
        assert found is not None and found.box[2] - found.box[0] > width - 10, (width, height)
    # A 1 written in its box from the top side to the bottom one: straight and thin, as the
    # wall between two boxes is, but with no field either side of it holding a digit.
    page = Image.new("L", (240, 200), 235)
    draw = ImageDraw.Draw(page)
    draw.rectangle((80, 40, 160, 160), outline=30, width=2)
    draw.line((121, 42, 119, 158), fill=20, width=3)
    found = preprocess(np.asarray(page))
    assert found is not None and found.box[2] - found.box[0] < 12, found
    # Typed zeros, round or nearly square, in every font at hand.
    for name, path in userstyle.FONTS.items():
        if path is not None and not os.path.isfile(path):
            continue
        typed = np.asarray(Image.open(io.BytesIO(userstyle.typed(0, 96, path))).convert("L"))
        mask = typed < 128
        assert without_boxes(mask, mask.astype(np.float32), 0.5)[0] is mask, name


def test_strokes_that_span_the_picture_are_not_taken_for_lines(digits):
    images, labels = digits
    # The bar of a tightly cropped 7 runs from side to side, as a line does; it is twice as
    # long as the digit is tall (no line is), so it stays.
    seven = images[int(np.flatnonzero(labels == 7)[0])]
    rows, cols = np.nonzero(seven > 60)
    tight = 255 - seven[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    tight = np.asarray(Image.fromarray(tight).resize((tight.shape[1] * 8, tight.shape[0] * 8)))
    thin = np.where(tight < 128, 0, 255).astype(np.uint8)
    for picture in (tight, thin):
        mask = picture < 128
        kept, _ = without_rules(mask, mask.astype(np.float32))
        assert kept is mask
    # A row of 7s cropped tightly: their bars line up across the picture, but not as straight
    # as a printed line, and the digits are read whole.
    sevens = [images[i] for i in np.flatnonzero(labels == 7)[:6]]
    line = userstyle.number_line(sevens, np.random.default_rng(3))
    grey = np.asarray(Image.open(io.BytesIO(line)).convert("L"))
    rows, cols = np.nonzero(grey < 128)
    cropped = grey[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    mask = cropped < 128
    assert without_rules(mask, mask.astype(np.float32))[0] is mask
    # Typed 7s: their bars line up exactly, but are as thick as the stems beside them.
    typed = np.asarray(Image.open(io.BytesIO(userstyle.typed(7, 40, None))).convert("L"))
    rows, cols = np.nonzero(typed < 128)
    seven = typed[rows.min() - 1 : rows.max() + 2, cols.min() - 1 : cols.max() + 2]
    row = np.hstack([seven] * 5)
    mask = row < 128
    assert without_rules(mask, mask.astype(np.float32))[0] is mask
    # A thin 1 cropped tightly spans the picture as a line would, alone: it stays.
    one = Image.new("L", (15, 60), 235)
    ImageDraw.Draw(one).line([(9, 3), (5, 57)], fill=20, width=2)
    assert preprocess(np.asarray(one)) is not None
    # A small picture has few strips: a stroke in the middle one is no line reaching the sides.
    assert labels[0] == 7
    small = np.asarray(Image.fromarray(images[0]).resize((32, 32)), np.float32)
    page = np.pad(255 - 0.8 * small, 4, constant_values=255).astype(np.uint8)
    mask = page < 128
    assert without_rules(mask, mask.astype(np.float32))[0] is mask


def test_a_bold_digit_cropped_tightly_is_read_and_a_blot_is_not(mnist):
    # A bold digit with 3 pixels of paper around it is one piece of ink over a third of the
    # picture, which was taken for a shadow or a blot and dropped: "no digit found".
    digit = mnist.test.images[8684, 0].numpy()
    big = np.asarray(Image.fromarray(digit).resize((140, 140), Image.Resampling.BILINEAR))
    rows, cols = np.nonzero(big > 76)
    ink = np.pad(big, 3)[rows.min() : rows.max() + 7, cols.min() : cols.max() + 7]
    page = (235 - ink.astype(np.float32) * 215 / 255).astype(np.uint8)
    assert (page < 128).mean() > 0.35
    found = preprocess(page)
    assert found is not None
    assert similar(found.image, preprocess(encode(on_paper(digit))).image, 20)
    # A solid blot as large is still not a digit.
    blot = np.full((120, 120), 235, np.uint8)
    yy, xx = np.mgrid[:120, :120]
    blot[(yy - 60) ** 2 + (xx - 60) ** 2 < 44**2] = 20
    assert preprocess(blot) is None


@pytest.mark.parametrize("margin", [0, 1, 2])
def test_a_digit_cropped_to_its_edges_is_found(mnist, margin):
    # Cropped to its ink, a bold digit covers 35-50% of the picture: the paper's noise was
    # measured over the ink's edges too, and the floor for ink rose above the ink itself
    # ("no digit found" for the 0 and the 8).
    for index in (4004, 1808, 7035, 5409):  # a 0, a 0, an 8 and a 4 (MNIST test)
        digit = mnist.test.images[index, 0].numpy()
        big = np.asarray(Image.fromarray(digit).resize((196, 196), Image.Resampling.BILINEAR))
        rows, cols = np.nonzero(big > 76)
        crop = np.pad(big, margin)[
            rows.min() : rows.max() + 1 + 2 * margin, cols.min() : cols.max() + 1 + 2 * margin
        ]
        page = (235 - crop.astype(np.float32) * 215 / 255).astype(np.uint8)
        found = preprocess(encode(Image.fromarray(page)))
        assert found is not None, (index, margin)
        assert similar(found.image, preprocess(encode(on_paper(digit))).image, 20), (index, margin)


@pytest.mark.parametrize("edge", [0.25, 0.4])
def test_a_page_mostly_in_shadow_is_read_as_dark_ink(digits, edge):
    # With most of the page shaded, the typical pixel is shaded paper, and the lit paper is as
    # far from it as the ink: the lit part was taken for light ink on a dark page.
    images, _ = digits
    for digit in images[:6]:
        page = np.asarray(on_paper(digit).convert("L"), np.float32) / 255 * 0.9
        width = page.shape[1]
        lit = np.clip((np.arange(width) - (1 - edge) * width) / 8, 0, 1)  # a soft edge
        shaded = page * (0.45 + 0.55 * lit)[None, :]
        found = preprocess((shaded * 255).astype(np.uint8))
        assert found is not None
        assert similar(found.image, preprocess(encode(on_paper(digit))).image, 20)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "array", "PIL JPEG"])
def test_a_small_digit_in_a_large_photo_is_looked_at_closer(digits, fmt):
    # A 4000x3000 photo is analysed at 320x240, where a digit 100 pixels tall is 8: too few
    # for its strokes' shapes. Found that small, it is looked at again with more pixels.
    images, labels = digits
    digit = images[3]
    page = np.full((3000, 4000), 230, np.uint8)
    ink = np.asarray(Image.fromarray(digit).resize((100, 100), Image.Resampling.BICUBIC))
    page[1700:1800, 2900:3000] = 230 - (ink.astype(np.float32) * 200 / 255).astype(np.uint8)
    if fmt == "array":
        found = preprocess(page)
    elif fmt == "PIL JPEG":
        # Opened lazily by the caller: JPEG's draft mode shrinks it in place while decoding,
        # so it cannot be decoded again with more pixels (this raised ZeroDivisionError).
        found = preprocess(Image.open(io.BytesIO(encode(Image.fromarray(page), "JPEG"))))
        assert found is not None and found.box[0] >= 2800
        return
    else:
        found = preprocess(encode(Image.fromarray(page), fmt))
    assert found is not None
    assert similar(found.image, preprocess(encode(on_paper(digit))).image, 12)
    rows, cols = np.nonzero(ink > 76)
    true_box = (2900 + cols.min(), 1700 + rows.min(), 2901 + cols.max(), 1701 + rows.max())
    assert np.abs(np.subtract(found.box, true_box)).max() <= 8, (found.box, true_box)


@pytest.mark.parametrize(
    "index, size, at, angle, edge, depth, softness",
    [
        (5409, 225, (472, 1176), 6.063, -432.2, 0.427, 12.25),  # a 4
        (8647, 203, (754, 376), 3.766, -441.3, 0.57, 3.29),  # a 6
        (3022, 220, (1014, 690), 3.805, -280.8, 0.529, 7.77),  # a 5
    ],
)
def test_a_hard_shadow_edge_across_a_large_photo_is_not_ink(
    mnist, index, size, at, angle, edge, depth, softness
):
    # Shrunk to the working size, a shadow's edge is a step. The mean that smoothed the
    # background estimate made a ramp of it, and the shaded side of the ramp a long stroke,
    # read as a 1 (these three were).
    digit = mnist.test.images[index, 0].numpy()
    height, width = 1500, 2000
    layer = np.zeros((height, width), np.float32)
    ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC))
    layer[at[0] : at[0] + size, at[1] : at[1] + size] = ink.astype(np.float32) / 255
    y, x = np.mgrid[:height, :width].astype(np.float32)
    across = (x - width / 2) * np.cos(angle) + (y - height / 2) * np.sin(angle)
    shade = depth / (1 + np.exp(np.clip(-(across - edge) / softness, -50, 50)))
    grey = 0.88 * (1 - 0.8 * layer) * (1 - shade)
    grey += np.random.default_rng(index).normal(0, 0.015, grey.shape)
    photo = encode(Image.fromarray(np.clip(grey * 255, 0, 255).astype(np.uint8)), "JPEG")
    found = preprocess(photo)
    assert found is not None
    assert similar(found.image, preprocess(encode(on_paper(digit))).image, 20)
    x0, y0, x1, y1 = found.box
    assert at[1] - 20 <= x0 and x1 <= at[1] + size + 20, found.box  # the digit, not the edge


def test_a_stray_dot_does_not_shrink_the_digit(digits):
    digit = digits[0][9]
    page = np.asarray(on_paper(digit, 120, (300, 400), (40, 40)).convert("L")).copy()
    reference = preprocess(page.copy()).image
    page[250:258, 350:358] = 0  # a dot far from the digit
    found = preprocess(page)
    assert similar(found.image, reference, 4)
    assert found.box[2] < 200  # the box stays on the digit
    assert found.others == 0  # a stray mark is no other digit


def test_other_digits_beside_the_one_read_are_counted(digits):
    images, _ = digits
    line = userstyle.number_line([images[i] for i in (0, 1, 2, 3)], np.random.default_rng(3))
    assert preprocess(line).others == 3
    assert preprocess(encode(on_paper(images[4]))).others == 0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_box_is_where_the_digit_is_in_the_original_picture(digits, fmt):
    # 1280x960: analysed at a quarter of its size (a JPEG shrunk while decoding), and only
    # around the strokes, so the box is mapped back through both.
    digit = digits[0][11]
    y, x, size = 500, 700, 240
    page = on_paper(digit, size, (960, 1280), (y, x))
    rows, cols = np.nonzero(np.asarray(page.convert("L")) < 128)
    expected = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    found = preprocess(encode(page, fmt))
    assert found.box is not None
    assert np.abs(np.subtract(found.box, expected)).max() <= 8, (found.box, expected)


def test_light_strokes_on_a_transparent_canvas(digits):
    digit = digits[0][10]
    rgba = np.zeros((280, 280, 4), np.uint8)
    ink = np.asarray(Image.fromarray(digit).resize((200, 200)))
    rgba[40:240, 40:240, :3] = 255  # white strokes
    rgba[40:240, 40:240, 3] = ink
    reference = preprocess(encode(on_paper(digit, 200, (280, 280), (40, 40)))).image
    assert similar(preprocess(encode(Image.fromarray(rgba, "RGBA"))).image, reference, 8)


def test_numpy_arrays_of_any_dtype_and_shape(digits):
    paper = np.asarray(on_paper(digits[0][11]))  # (H, W, 3) uint8
    reference = preprocess(paper).image
    for array in (
        paper.astype(np.float64),  # 0-255 floats
        paper.astype(np.float32) / 255,  # 0-1 floats
        paper.astype(np.int64),
        paper[..., :1],  # (H, W, 1)
        paper.astype(np.uint16) * 257,
        paper.astype(np.int32) * 257,  # 16-bit values in a wider type (Pillow's mode "I")
        paper.astype(np.float32) * 257,
        paper.astype(object),  # numbers as Python objects
    ):
        assert similar(preprocess(array).image, reference, 3), array.dtype
    # Values that are no pixels are refused, not read as a blank picture or cut to their
    # real part.
    spoiled = paper.astype(np.float32)
    spoiled[100, 100:103, 0] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ImageError, match="3 NaN or infinite"):
        preprocess(spoiled)
    words = np.full(paper.shape, "ink", object)
    for array in (paper.astype(np.complex64), words, paper.astype(str)):
        with pytest.raises(ImageError, match="real numbers"):
            preprocess(array)
    with pytest.raises(ImageError, match="must be"):
        preprocess(np.zeros((0, 5), np.uint8))
    with pytest.raises(ImageError, match="text mode"):
        preprocess(io.StringIO("not bytes"))


def test_a_blank_page_on_a_dark_desk_is_no_digit():
    desk = np.full((300, 400), 25, np.uint8)
    desk[30:270, 40:360] = 230  # the page, blank, with the desk all around it
    assert preprocess(desk) is None


def test_a_blank_scan_with_a_dark_edge_is_no_digit(digits):
    # A scanner's lid or a desk along one to three sides and nothing written: the band was
    # kept as a tightly cropped digit (mostly read as 1: 24 of these 40 before).
    rng = np.random.default_rng(31)
    blank = np.zeros((28, 28), np.uint8)
    found = sum(preprocess(userstyle.scan(blank, rng)) is not None for _ in range(40))
    assert found <= 2
    # A tightly cropped 1, which touches the picture's top and bottom, is still a digit.
    images, labels = digits
    ones = [userstyle.tight(image, rng) for image in images[labels == 1][:12]]
    assert all(preprocess(picture) is not None for picture in ones)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 0.3), st.integers(0, 3), st.integers()
)
def test_growing_a_mask_is_scipys_dilation(height, width, density, steps, seed):
    from lenet.segment import grow

    mask = np.random.default_rng(seed % 2**32).random((height, width)) < density
    expected = ndimage.binary_dilation(mask, iterations=steps) if steps else mask
    before = mask.copy()
    assert np.array_equal(grow(mask, steps), expected)
    assert np.array_equal(mask, before)  # the caller's mask is left as it was


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers())
def test_extremes_of_3x3_means_are_scipys(height, width, seed):
    from lenet.preprocess import _mean3_extremes

    grey = np.random.default_rng(seed % 2**32).random((height, width), dtype=np.float32)
    means = ndimage.uniform_filter(grey.astype(np.float64), size=3, mode="nearest")
    assert _mean3_extremes(grey) == pytest.approx((means.min(), means.max()), abs=1e-6)


def test_the_working_size_fits_photos_and_keeps_lines_of_digits_tall():
    # Photos and drawings (up to 2.5 times as long as high): the long side to WORK_MAX_SIDE.
    assert work_scale(640, 480) == WORK_MAX_SIDE / 640
    assert work_scale(3000, 4000) == WORK_MAX_SIDE / 4000
    assert work_scale(280, 280) == 1.0  # small pictures are never enlarged
    # A line of digits keeps WORK_MIN_SIDE pixels on its short side...
    assert round(2800 * work_scale(2800, 200)) == 2800 * WORK_MIN_SIDE // 200
    assert round(200 * work_scale(2800, 200)) == WORK_MIN_SIDE
    # ...within a bound on the pixels in all.
    scale = work_scale(20000, 400)
    assert 20000 * 400 * scale**2 == pytest.approx(4 * WORK_MAX_SIDE**2)
