import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lenet.data.idx import encode_idx, parse_idx, read_idx, write_idx
from lenet.errors import IdxFormatError


@pytest.mark.parametrize("compress", [False, True])
def test_images_and_labels_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    write_idx(tmp_path / "img", images, compress=compress)
    write_idx(tmp_path / "lab", labels, compress=compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "img"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab"), labels)
    raw = (tmp_path / "img").read_bytes()
    assert raw.startswith(b"\x1f\x8b") == compress


def test_header_matches_the_format_spec():
    # Written by hand from the format description: magic 0x00000803, then 3 big-endian dims.
    data = encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))
    assert data[:4] == bytes([0, 0, 0x08, 3])
    assert data[4:16] == (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert len(data) == 16 + 2 * 28 * 28


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
    )
)
def test_any_supported_array_round_trips(array):
    back = parse_idx(encode_idx(array))
    assert back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_truncated_file_names_the_file_and_sizes(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(encode_idx(np.zeros((3, 28, 28), np.uint8))[:-10])
    with pytest.raises(IdxFormatError, match=r"train-images-idx3-ubyte is truncated.*2,358"):
        read_idx(path)


def test_file_longer_than_header_says():
    with pytest.raises(IdxFormatError, match="longer than its header says"):
        parse_idx(encode_idx(np.zeros(4, np.uint8)) + b"\0", "labels")


def test_wrong_magic_is_refused():
    with pytest.raises(IdxFormatError, match="magic number is 0x504b0304"):
        parse_idx(b"PK\x03\x04" + b"\0" * 100, "archive.zip")


def test_unknown_type_byte_is_refused():
    with pytest.raises(IdxFormatError, match="not an IDX file"):
        parse_idx(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))


def test_truncated_header_and_tiny_files():
    with pytest.raises(IdxFormatError, match="truncated inside its header"):
        parse_idx(bytes([0, 0, 0x08, 3, 0, 0, 0, 1]))
    with pytest.raises(IdxFormatError, match="only 2 bytes"):
        parse_idx(b"\0\0")


def test_damaged_gzip_is_named():
    data = gzip.compress(encode_idx(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(IdxFormatError, match="damaged gzip"):
        parse_idx(data[: len(data) // 2], "x.gz")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(IdxFormatError, match="Cannot read"):
        read_idx(tmp_path / "nope")
