"""Where the service reads pictures: in reading processes (the default) or in threads.

Reading a canvas picture is 3 to 4 ms of Python and NumPy work (decoding, finding the ink,
the MNIST construction; the model itself is 0.1 to 0.3 ms). In threads, the GIL lets the
server use about 1.4 of two cores; in processes of their own, each with its own copy of the
model, 16 clients on a 2-core machine were answered at 270 to 367 requests/s against 135 to
221 with threads, alternated in the same runs (benchmarks/serve_load.py, section 6, measured
before PNGs were decoded by libspng; the README has the current figures). The server process
keeps the HTTP work, and a Recognizer of its own for /v1/models and /v1/explain (which needs
PyTorch's gradients and is rarely asked).

A reading process that dies (killed, out of memory) takes the picture it was reading with it:
that request is answered 503 and a new process takes its place. A reading process exits when
the server does, even when the server is killed (its pipe to the server closes).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from lenet.errors import LenetError
from lenet.recognize import Recognizer

log = logging.getLogger("lenet.server")

READINGS = ("processes", "threads")
# Start-up of a reading process: a fresh interpreter importing NumPy, SciPy, Pillow and the
# model's runtime, then loading the model (1 to 3 s here; more on a busy or slow machine).
START_TIMEOUT_S = 120.0
# A reader is sent its next picture while it reads one, so that it never waits for the server
# between pictures; only pictures this small, behind one this small, so that the send fits
# the pipe's buffer (it must never block the event loop) and no picture waits behind a slow
# one (a canvas PNG is a few kB).
PIPELINED_BYTES = 32 * 1024
# Asked of each pipe's socket buffers: Linux gives about 208 kB anyway; macOS's default is
# 8 kB. The pipelining limit shrinks to what the buffer really holds.
PIPE_BUFFER_BYTES = 256 * 1024
# A reader that cannot be started again is retried after 1, 2, 4 ... seconds, at most this.
RETRY_MAX_S = 30.0


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


# What the metrics count for each digit in an answer: (digit, reason).
Counted = list[tuple[int | None, str | None]]


def read_picture(
    recognizer: Recognizer, kind: str, data: bytes, include_input: bool
) -> tuple[dict[str, Any], Counted]:
    """The JSON answer of /v1/predict (``kind`` "predict") or /v1/read ("read"), and what
    the server's metrics count for it."""
    if kind == "predict":
        prediction = recognizer.predict(data)
        out = prediction.to_dict()
        if include_input and prediction.image is not None:
            out["input"] = png_data_url(prediction.image)
        return out, [(prediction.digit, prediction.reason)]
    reading = recognizer.read(data)
    out = reading.to_dict()
    if include_input:
        for item, prediction in zip(out["digits"], reading.digits):
            if prediction.image is not None:
                item["input"] = png_data_url(prediction.image)
    return out, [(p.digit, p.reason) for p in reading.digits]


Answer = tuple[dict[str, Any], Counted] | None  # None: dropped, its client answered already


def _late_or_read(
    recognizer: Recognizer, kind: str, data: bytes, include_input: bool, deadline: float
) -> Answer:
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

    def submit(
        self, kind: str, data: bytes, include_input: bool, deadline: float
    ) -> Future[Answer]:
        return self.pool.submit(_late_or_read, self.recognizer, kind, data, include_input, deadline)

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def quiet_bad_input_noise() -> None:
    """Keep damaged uploads out of the operator's log: each is answered 4xx with what was
    wrong, and the libraries' own words on it (python-multipart logs a warning before it
    raises; Pillow warns of damaged TIFF metadata) would repeat every one, without saying
    which request it was."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    for name in ("python_multipart.multipart", "multipart.multipart"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _reader_main(
    connection: multiprocessing.connection.Connection,
    weights: str | None,
    backend: str,
    max_pixels: int,
) -> None:
    """A reading process: load the model, say whether it passed the self-test, then answer
    each picture sent until the server sends None or goes away."""
    # Ctrl-C reaches the whole process group, and a service manager's stop (SIGTERM) often
    # too: the server, still answering, stops its readers itself once it is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    quiet_bad_input_noise()
    from lenet.allocator import freeze_loaded_objects, keep_freed_memory

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
    try:
        connection.send(problem)
    except OSError:  # the server is gone already
        return
    if problem is not None:
        return
    freeze_loaded_objects()
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):  # the server is gone (even SIGKILLed): so is its reader
            return
        if job is None:
            return
        try:  # None when it waited in the pipe past its time limit
            answer: tuple[str, Any] = ("ok", _late_or_read(recognizer, *job))
        except LenetError as exc:  # the picture's fault: answered 4xx with this message
            answer = ("refused", (type(exc), str(exc)))
        except Exception as exc:  # a bug: the server answers 500 and logs it
            answer = ("failed", f"{type(exc).__name__}: {exc}")
        try:
            connection.send(answer)
        except OSError:  # the server is gone
            return
        except Exception as exc:  # an answer that cannot be pickled: a bug, said so
            connection.send(("failed", f"the answer could not be sent back: {exc}"))


class ReaderFailed(Exception):
    """A reading process failed on a picture in a way the picture cannot explain (a bug)."""


def _rebuilt(error_type: Any, text: str) -> Exception:
    """The reader's LenetError again, to be answered with its status and message."""
    try:
        error = error_type(text)
    except Exception:
        error = None
    return error if isinstance(error, LenetError) else LenetError(text)


def _widen_buffers(connection: multiprocessing.connection.Connection) -> int:
    """Ask for PIPE_BUFFER_BYTES of socket buffer on a pipe's end; what its send buffer
    holds (0 when it is not a socket)."""
    try:
        end = socket.socket(fileno=os.dup(connection.fileno()))
    except OSError:
        return 0
    with end:  # a duplicate of the descriptor: the options are the socket's own
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                end.setsockopt(socket.SOL_SOCKET, option, PIPE_BUFFER_BYTES)
            except OSError:
                pass
        return end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


class _Job:
    def __init__(self, kind: str, data: bytes, include_input: bool, deadline: float) -> None:
        self.message = (kind, data, include_input)
        self.small = len(data) <= PIPELINED_BYTES
        self.deadline = deadline
        self.future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()


class _Reader:
    """One reading process and the server's end of its pipe."""

    def __init__(self, process: Any, connection: multiprocessing.connection.Connection) -> None:
        self.process = process
        self.connection = connection
        self.ready: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        # The picture it is reading, and the next one waiting in its pipe.
        self.jobs: collections.deque[_Job] = collections.deque()
        # Both ends' buffers widened: a quarter of what one holds is always free for a
        # pipelined picture, whatever the answer on its way back.
        self.pipelined_bytes = min(PIPELINED_BYTES, _widen_buffers(connection) // 4)


class ProcessReaders:
    """Pictures read in ``count`` processes of their own, each with its own Recognizer.

    Each reader has a pipe of its own, and everything on the server's side runs on the event
    loop: a picture is sent to the reader with the least work, and the answer is read when
    the pipe becomes readable. A reader reading a small picture is sent the next small one,
    so that it never waits for the server between pictures. Pictures wait in a queue while
    no reader can take them; one whose deadline has passed is dropped, not read.

    Not concurrent.futures.ProcessPoolExecutor (measured as fast, 265-315 requests/s either
    way): when one of its processes dies, every request in flight in any of them fails and
    the whole pool must be replaced, 503s for a second or two; here only the picture the
    dead reader was reading is lost, and the other readers go on while it is replaced.
    """

    def __init__(
        self,
        weights: str | None,
        backend: str,
        max_pixels: int,
        count: int,
        on_change: Callable[[int, bool], None] | None = None,
    ) -> None:
        """``on_change(serving, died)``: told the number of readers serving whenever it
        changes, and whether a serving reader died (for the service's metrics)."""
        self.args = (weights, backend, max_pixels)
        self.count = count
        self.on_change = on_change
        # spawn, not fork: the server has threads (fork would copy their locks mid-use), and
        # spawn is what every platform has.
        self.context = multiprocessing.get_context("spawn")
        self.readers: list[_Reader] = []  # started and not stopped
        self.serving: list[_Reader] = []  # of those, the ones that passed the self-test
        self.waiting: collections.deque[_Job] = collections.deque()
        self.replacing: set[asyncio.Task[None]] = set()
        self.last_problem: str | None = None  # the last reader's failure to start
        self.started = False
        self.closed = False

    def _spawn(self) -> _Reader:
        ours, theirs = self.context.Pipe()
        _widen_buffers(theirs)
        process = self.context.Process(
            target=_reader_main, args=(theirs, *self.args), name="lenet-reader", daemon=True
        )
        process.start()
        theirs.close()  # the reader's end lives in the reader only: its exit closes the pipe
        reader = _Reader(process, ours)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable, reader)
        self.readers.append(reader)
        return reader

    async def start(self) -> str | None:
        """Start the reading processes and wait until each has loaded the model and passed
        the self-test; what went wrong, or None."""
        started = [self._spawn() for _ in range(self.count)]
        done, _ = await asyncio.wait([r.ready for r in started], timeout=START_TIMEOUT_S)
        problems = [
            r.ready.result()
            if r.ready in done
            else f"a reading process did not start within {START_TIMEOUT_S:g} s"
            for r in started
        ]
        problems = [p for p in problems if p is not None]
        if problems:
            self.last_problem = "; ".join(dict.fromkeys(problems))
            for reader in started:
                self._stop(reader)
            return self.last_problem
        self.started = True
        for reader in started:
            self._serve(reader)
        return None

    def problem(self) -> str | None:
        """Why no picture can be read now (for /readyz), or None while a reader serves."""
        if self.closed:
            return "shut down"
        if self.serving:
            return None
        if not self.started:
            return self.last_problem or "starting"
        if self.last_problem is not None:
            return f"no reading process is running ({self.last_problem}); retrying"
        return "no reading process is running; a new one is starting"

    def submit(
        self, kind: str, data: bytes, include_input: bool, deadline: float
    ) -> asyncio.Future[Answer]:
        """The answer to come (None: dropped for its deadline). Call on the event loop."""
        problem = self.problem()
        # With none serving, a picture waits for a reader being started, unless the last
        # start failed: then it is refused at once.
        if problem is not None and (self.closed or not self.started or self.last_problem):
            raise Busy(f"The reading processes are not running ({problem}); retry in a moment.")
        job = _Job(kind, data, include_input, deadline)
        self.waiting.append(job)
        self._dispatch()
        return job.future

    def _dispatch(self) -> None:
        while self.waiting:
            job = self.waiting[0]
            if job.future.done():
                self.waiting.popleft()
                continue
            if time.monotonic() > job.deadline:
                self.waiting.popleft()
                job.future.set_result(None)  # its client has been answered 503 already
                continue
            reader = min(self.serving, key=lambda r: len(r.jobs), default=None)
            if reader is None or len(reader.jobs) >= 2:
                return
            if reader.jobs and not (
                reader.jobs[0].small and len(job.message[1]) <= reader.pipelined_bytes
            ):
                return  # sent once a reader is free
            self.waiting.popleft()
            reader.jobs.append(job)
            try:
                reader.connection.send((*job.message, job.deadline))
            except OSError:  # the reader died just now: its pipe's end says so next
                reader.jobs.pop()
                self.waiting.appendleft(job)
                return

    def _serve(self, reader: _Reader) -> None:
        self.serving.append(reader)
        self._changed(died=False)
        self._dispatch()

    def _changed(self, died: bool) -> None:
        if self.on_change is not None:
            self.on_change(len(self.serving), died)

    def _readable(self, reader: _Reader) -> None:
        try:
            message = reader.connection.recv()
        except Exception:  # closed (EOFError, OSError) or garbled: the reader is done for
            self._died(reader)
            return
        if not reader.ready.done():
            reader.ready.set_result(message)
            return
        if not reader.jobs:  # nothing was asked of it: a reader never sends unasked
            return
        job = reader.jobs.popleft()
        if not job.future.done():
            status, value = message
            if status == "ok":
                job.future.set_result(value)
            elif status == "refused":
                job.future.set_exception(_rebuilt(*value))
            else:
                job.future.set_exception(ReaderFailed(value))
        self._dispatch()

    def _stop(self, reader: _Reader) -> None:
        if reader in self.readers:
            self.readers.remove(reader)
        if reader in self.serving:
            self.serving.remove(reader)
        if not reader.connection.closed:
            asyncio.get_running_loop().remove_reader(reader.connection.fileno())
            reader.connection.close()
        if reader.process.is_alive():
            reader.process.kill()
        reader.process.join(1)

    def _died(self, reader: _Reader) -> None:
        jobs = list(reader.jobs)
        was_serving = reader in self.serving
        self._stop(reader)
        if was_serving:
            self._changed(died=not self.closed)
        if not reader.ready.done():
            reader.ready.set_result("a reading process exited while loading the model")
        if jobs and not jobs[0].future.done():
            jobs[0].future.set_exception(
                Busy(
                    "The reading process stopped while reading this picture; a new one is "
                    "starting: retry in a moment."
                )
            )
        # The next picture, not yet begun, goes to another reader.
        self.waiting.extendleft(reversed(jobs[1:]))
        self._dispatch()
        if self.closed or not was_serving:
            return  # one that failed to start is retried by _replace, not here
        log.error("lenet serve: a reading process stopped unexpectedly; starting a new one")
        task = asyncio.get_running_loop().create_task(self._replace())
        self.replacing.add(task)
        task.add_done_callback(self.replacing.discard)

    async def _replace(self) -> None:
        """Start a reader in place of one that died, retrying (with a growing pause) until
        one passes the self-test."""
        pause = 1.0
        while not self.closed:
            reader = self._spawn()
            try:
                problem = await asyncio.wait_for(asyncio.shield(reader.ready), START_TIMEOUT_S)
            except asyncio.TimeoutError:
                problem = f"a new reading process did not start within {START_TIMEOUT_S:g} s"
            if self.closed:
                self._stop(reader)
                return
            if problem is None:
                self.last_problem = None
                self._serve(reader)
                return
            self._stop(reader)
            self.last_problem = problem
            log.error(
                "lenet serve: a reading process could not be started (%s); retrying in %g s",
                problem,
                pause,
            )
            if not self.serving:
                # Nothing will read them: answered at once rather than at their time limit.
                self._fail_waiting(f"The reading processes are not running ({problem}).")
            await asyncio.sleep(pause)
            pause = min(2 * pause, RETRY_MAX_S)

    def _fail_waiting(self, message: str) -> None:
        while self.waiting:
            job = self.waiting.popleft()
            if not job.future.done():
                job.future.set_exception(Busy(message))

    def pids(self) -> list[int]:
        """The reading processes' ids (for tests and monitoring)."""
        return sorted(r.process.pid for r in self.readers)

    def close(self) -> None:
        """Stop every reader once the picture it is reading is answered (milliseconds; a
        few seconds at most). Call on the event loop."""
        self.closed = True
        for task in self.replacing:
            task.cancel()
        self._fail_waiting("The service is shutting down.")
        for reader in list(self.readers):
            try:
                reader.connection.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for reader in list(self.readers):
            reader.process.join(max(deadline - time.monotonic(), 0.0))
            for job in reader.jobs:
                if not job.future.done():
                    job.future.set_exception(Busy("The service is shutting down."))
            self._stop(reader)
        self._changed(died=False)
