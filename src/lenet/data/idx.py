"""The IDX file format of MNIST and Fashion-MNIST: parse, validate, write.

Layout (big-endian): two zero bytes, a type byte, a byte with the number of dimensions, one
uint32 per dimension, then the values in C order. Gzipped files are recognised by their
magic bytes, not their name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from lenet.atomic import write_bytes_atomic
from lenet.errors import IdxFormatError

# type byte -> big-endian numpy dtype, as defined by the format.
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def decompress_if_gzipped(data: bytes, name: str = "<bytes>") -> bytes:
    """Return ``data`` gunzipped when it starts with the gzip magic, unchanged otherwise."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(
            f"{name} is a damaged gzip file ({exc}). Delete it and fetch it again "
            "(`lenet data fetch`)."
        ) from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file (gzipped or not) into a native-endian numpy array.

    Raises IdxFormatError naming ``name`` when the magic number, type, dimensions or length
    are wrong.
    """
    data = decompress_if_gzipped(data, name)
    advice = "Delete it and fetch it again (`lenet data fetch`)."
    if len(data) < 4:
        raise IdxFormatError(f"{name} is not an IDX file: only {len(data)} bytes long. {advice}")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in IDX_TYPES:
        raise IdxFormatError(
            f"{name} is not an IDX file: its magic number is 0x{data[:4].hex()} "
            "(expected 0x0000 then a type byte such as 0x08 and the number of dimensions). "
            f"{advice}"
        )
    if ndim == 0:
        raise IdxFormatError(f"{name} declares 0 dimensions; an IDX file needs at least one.")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxFormatError(
            f"{name} is truncated inside its header ({len(data)} of {header_len} bytes). {advice}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_TYPES[type_code]
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise IdxFormatError(
            f"{name} is {state}: {len(data):,} bytes, but its header (shape {tuple(shape)}) "
            f"needs {expected:,}. {advice}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not) from ``path``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdxFormatError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    return parse_idx(data, str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX bytes (uncompressed)."""
    array = np.asarray(array)
    matches = [
        (code, dtype)
        for code, dtype in IDX_TYPES.items()
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize
    ]
    if not matches:
        raise IdxFormatError(f"IDX cannot hold arrays of dtype {array.dtype}.")
    code, dtype = matches[0]
    if not 1 <= array.ndim <= 255:
        raise IdxFormatError(f"IDX needs 1 to 255 dimensions, got {array.ndim}.")
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` to ``path`` as IDX, atomically; gzipped when ``compress``."""
    data = encode_idx(array)
    if compress:
        data = gzip.compress(data, mtime=0)
    write_bytes_atomic(path, data)
