"""Where the service reads pictures: in reading processes (the default) or in threads.

Reading a canvas picture is 4 to 5 ms of Python and NumPy work (decoding, finding the ink,
the MNIST construction; the model itself is 0.3 ms). In threads, the GIL lets two readers use
about 1.3 of two cores: 135 to 180 requests/s with 16 clients on a 2-core machine. In
separate processes, each with its own copy of the model (a few MB), the same load was
answered at 292 to 315 requests/s, p99 69 to 73 ms against 128 to 180 ms
(benchmarks/serve_load.py; the README has the figures). The server process itself keeps the
HTTP work, and a Recognizer of its own for /v1/models and /v1/explain (which needs PyTorch's
gradients and is rarely asked).

A reading process that dies (killed, out of memory) takes its requests with it; they are
answered 503 and a new set of processes is started in the background. A reading process exits
when the server does, even when the server is killed.
"""

from __future__ import annotations

import base64
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from PIL import Image

from lenet.errors import LenetError
from lenet.recognize import Recognizer

log = logging.getLogger("lenet.server")

READINGS = ("processes", "threads")
# The routes whose work a reader does: one digit (/v1/predict) or a line of them (/v1/read).
KINDS = ("predict", "read")
# Start-up of a reading process: a fresh interpreter importing NumPy, SciPy, Pillow and the
# model's runtime, then loading the model (1 to 3 s here; more on a busy or slow machine).
START_TIMEOUT_S = 120.0


class Busy(LenetError):
    """The service has more work waiting than it can answer in time."""

    status = 503
    reason = "busy"


def self_test(recognizer: Recognizer) -> str | None:
    """None when the model reads a drawn 1 and finds nothing in a blank picture, else what
    went wrong (the problem /readyz reports)."""
    one = np.zeros((28, 28), np.uint8)
    one[5:23, 13:16] = 255  # a white vertical bar on black: a 1 any digit model reads
    answer = recognizer.predict(one)
    blank = recognizer.predict(np.zeros((28, 28), np.uint8))
    total = sum(answer.probabilities)
    if answer.best_guess is None or abs(total - 1.0) > 1e-3 or blank.best_guess is not None:
        return (
            f"self-test failed: a drawn 1 gave {answer.to_dict()}, a blank gave {blank.to_dict()}"
        )
    return None


def png_data_url(image: np.ndarray) -> str:
    """A small picture (the 28x28 input the model saw) as a PNG data URL, for the page."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_picture(
    recognizer: Recognizer, kind: str, data: bytes, include_input: bool
) -> dict[str, Any]:
    """The JSON answer of /v1/predict (``kind`` "predict") or /v1/read ("read")."""
    if kind == "predict":
        prediction = recognizer.predict(data)
        out = prediction.to_dict()
        if include_input and prediction.image is not None:
            out["input"] = png_data_url(prediction.image)
        return out
    reading = recognizer.read(data)
    out = reading.to_dict()
    if include_input:
        for item, prediction in zip(out["digits"], reading.digits):
            if prediction.image is not None:
                item["input"] = png_data_url(prediction.image)
    return out


def _late_or_read(
    recognizer: Recognizer, kind: str, data: bytes, include_input: bool, deadline: float
) -> dict[str, Any] | None:
    # Work whose client has already been answered 503 is skipped (None), not done late.
    # time.monotonic is the system's monotonic clock, the same in every process.
    if time.monotonic() > deadline:
        return None
    return read_picture(recognizer, kind, data, include_input)


class ThreadReaders:
    """Pictures read in threads of the server process, with its own Recognizer."""

    def __init__(self, recognizer: Recognizer, count: int) -> None:
        self.recognizer = recognizer
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="lenet-read")

    def start(self) -> str | None:
        return None

    def submit(
        self, kind: str, data: bytes, include_input: bool, deadline: float
    ) -> Future[dict[str, Any] | None]:
        return self.pool.submit(_late_or_read, self.recognizer, kind, data, include_input, deadline)

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# In a reading process: its Recognizer, loaded once by _start_reader.
_recognizer: Recognizer | None = None


def _exit_with_parent() -> None:
    """End this process as soon as the server that started it is gone (even SIGKILLed):
    the pool's pipes stay open in each child, so a child would otherwise wait forever."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="lenet-parent-watch", daemon=True).start()


def _start_reader(
    weights: str | None, backend: str, max_pixels: int, ready: multiprocessing.Queue
) -> None:
    """A reading process's start: load the model and report whether it passed the self-test."""
    global _recognizer
    # Ctrl-C reaches the whole process group; the server shuts its readers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    from lenet.server.allocator import keep_freed_memory

    keep_freed_memory()
    try:
        recognizer = Recognizer.load(weights, backend=backend)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)  # one picture at a time: more threads only wait
        recognizer.max_pixels = max_pixels
        problem = self_test(recognizer)
    except Exception as exc:  # reported to the server, which says it is not ready
        problem = f"a reading process could not load the model: {exc}"
    else:
        _recognizer = recognizer
    ready.put((os.getpid(), problem))


def _read_in_child(
    kind: str, data: bytes, include_input: bool, deadline: float
) -> dict[str, Any] | None:
    if _recognizer is None:
        raise Busy("A reading process has no model loaded; retry in a moment.")
    return _late_or_read(_recognizer, kind, data, include_input, deadline)


class ProcessReaders:
    """Pictures read in ``count`` processes of their own, each with its own Recognizer."""

    def __init__(self, weights: str | None, backend: str, max_pixels: int, count: int) -> None:
        self.initargs = (weights, backend, max_pixels)
        self.count = count
        # spawn, not fork: the server has threads (fork would copy their locks mid-use), and
        # spawn is what every platform has.
        self.context = multiprocessing.get_context("spawn")
        self.lock = threading.Lock()
        self.executor: ProcessPoolExecutor | None = None
        self.failure: str | None = "starting"
        self.closed = False

    def _launch(self) -> tuple[ProcessPoolExecutor | None, str | None]:
        ready = self.context.Queue()
        executor = ProcessPoolExecutor(
            self.count,
            mp_context=self.context,
            initializer=_start_reader,
            initargs=(*self.initargs, ready),
        )
        # A process is started for each task submitted while none is idle: this starts all.
        for _ in range(self.count):
            executor.submit(os.getpid)
        problems = []
        deadline = time.monotonic() + START_TIMEOUT_S
        for _ in range(self.count):
            try:
                _, problem = ready.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                problems.append(f"a reading process did not start within {START_TIMEOUT_S:g} s")
                break
            if problem is not None:
                problems.append(problem)
        ready.close()
        if problems:
            executor.shutdown(wait=False, cancel_futures=True)
            return None, "; ".join(dict.fromkeys(problems))
        return executor, None

    def start(self) -> str | None:
        """Start the reading processes and wait until each has loaded the model and passed
        the self-test; what went wrong, or None."""
        executor, failure = self._launch()
        with self.lock:
            self.executor, self.failure = executor, failure
        return failure

    def submit(
        self, kind: str, data: bytes, include_input: bool, deadline: float
    ) -> Future[dict[str, Any] | None]:
        with self.lock:
            executor = self.executor
        if executor is None:
            raise Busy(
                f"The reading processes are not running ({self.failure}); retry in a moment."
            )
        try:
            future = executor.submit(_read_in_child, kind, data, include_input, deadline)
        except BrokenProcessPool:
            # A process died while none of its work was waiting: seen only now.
            self._broken(executor)
            raise Busy(
                "A reading process stopped; new ones are starting: retry in a moment."
            ) from None
        future.add_done_callback(lambda done: self._check(done, executor))
        return future

    def _check(self, done: Future[Any], executor: ProcessPoolExecutor) -> None:
        if not done.cancelled() and isinstance(done.exception(), BrokenProcessPool):
            self._broken(executor)

    def _broken(self, executor: ProcessPoolExecutor) -> None:
        with self.lock:
            if self.executor is not executor or self.closed:
                return  # already being replaced
            self.executor, self.failure = None, "a reading process stopped; restarting them"
        log.error("lenet serve: a reading process stopped unexpectedly; starting new ones")
        threading.Thread(target=self._replace, args=(executor,), daemon=True).start()

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        broken.shutdown(wait=False, cancel_futures=True)
        executor, failure = self._launch()
        with self.lock:
            if self.closed:
                if executor is not None:
                    executor.shutdown(wait=False, cancel_futures=True)
                return
            self.executor, self.failure = executor, failure
        if failure is not None:
            log.error("lenet serve: the reading processes could not be restarted: %s", failure)

    def problem(self) -> str | None:
        """Why pictures cannot be read now (for /readyz), or None."""
        with self.lock:
            return self.failure

    def pids(self) -> list[int]:
        """The reading processes' ids (for tests and monitoring)."""
        with self.lock:
            executor = self.executor
        processes = getattr(executor, "_processes", None) or {}
        return sorted(processes)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            executor, self.executor = self.executor, None
            self.failure = "shut down"
        if executor is not None:
            # Waits for the pictures being read (milliseconds) so no process is left behind.
            executor.shutdown(wait=True, cancel_futures=True)
