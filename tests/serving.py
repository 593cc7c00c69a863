"""A real `lenet serve` process on a free port of 127.0.0.1, for the tests that need one."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def started_by(pid: int) -> list[int]:
    """The processes ``pid`` started (a server's reading processes, and multiprocessing's
    resource tracker), from each process's parent in /proc/*/stat (Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass  # ended while being read
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def lenet_serve(
    *options: str, ready_within: float = 60.0, log: Path | None = None
) -> Iterator[str]:
    """Start `python -m lenet serve OPTIONS`, wait for /readyz, yield its base URL, stop it.
    ``log``: a file to write its output to (default: a pipe)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lenet", "serve", "--port", str(port), *options],
        stdout=subprocess.PIPE if log is None else log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if process.poll() is not None:
                    said = process.stdout.read() if log is None else log.read_text()
                    raise AssertionError(f"lenet serve exited: {said}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"lenet serve was not ready in {ready_within:g} s"
                    ) from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(20)
