"""Shared fixtures: real MNIST (fetched once per session) and a real local HTTP server."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lenet.data import Dataset, Split, load_dataset


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    """The real MNIST, from the user's cache or fetched through the normal sources."""
    return load_dataset("mnist")


@pytest.fixture(scope="session")
def small_mnist(mnist: Dataset) -> Dataset:
    """Real MNIST with the first 12,000 training images: enough to learn, quick to train."""
    keep = slice(0, 12_000)
    return Dataset(
        spec=mnist.spec,
        train=Split(mnist.train.images[keep], mnist.train.labels[keep]),
        val=mnist.val,
        test=mnist.test,
        folder=mnist.folder,
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a temporary folder: yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch, request) -> None:
    """Tests that do not ask for real MNIST get an empty cache, so they never touch the user's."""
    if {"mnist", "small_mnist"} & set(request.fixturenames):
        return
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("LENET_DATA_DIR", raising=False)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)
