"""The HTTP service: the API over the Recognizer, the drawing page, health and metrics.

The model is loaded once when the app starts (lifespan) and answers a self-test before
/readyz says ready. Reading pictures is CPU work, so it runs off the event loop, in reading
processes or threads (lenet.server.readers); at most ``max_pending`` requests wait for it, and
a request that waits longer than ``timeout_s`` is answered 503 instead of piling up behind the
others.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lenet import __version__
from lenet.allocator import freeze_loaded_objects, keep_freed_memory
from lenet.errors import LenetError
from lenet.preprocess import DEFAULT_MAX_PIXELS
from lenet.recognize import Recognizer
from lenet.server import schemas
from lenet.server.metrics import MetricsMiddleware, ServiceMetrics
from lenet.server.readers import (
    READINGS,
    Busy,
    ProcessReaders,
    ThreadReaders,
    quiet_bad_input_noise,
    self_test,
)
from lenet.server.uploads import read_upload

log = logging.getLogger("lenet.server")

SETTINGS_ENV = "LENET_SERVE_SETTINGS"


@dataclass(frozen=True)
class ServeSettings:
    """What `lenet serve` was started with."""

    weights: str | None = None  # a bundled name or a weights file; None: the best bundled
    backend: str = "auto"  # torch, onnx, or auto (see serving_backend)
    host: str = "127.0.0.1"
    port: int = 8000
    # 5 MB holds a phone photo as JPEG; a canvas drawing is a few kB.
    max_upload_bytes: int = 5 * 1024 * 1024
    # Checked from the header before decoding, so a tiny file claiming a huge size costs nothing.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Processes: each reads pictures with its own model, free of the other's GIL (about twice
    # the requests a second of threads on two cores; lenet.server.readers). Threads: no
    # start-up cost and one model in memory, for tests and small machines.
    reading: str = "processes"
    # Readers (processes or threads) of this server process; `lenet serve` starts one per
    # core it may use (default_readers).
    readers: int = 2
    # Requests waiting for a reader beyond this are refused at once (503) rather than queued.
    max_pending: int = 128
    # A request not answered within this is answered 503: the client can retry elsewhere.
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.reading not in READINGS:
            raise LenetError(f"reading must be one of {', '.join(READINGS)}, not {self.reading!r}.")
        if self.readers < 1:
            raise LenetError(f"readers must be at least 1, not {self.readers}.")

    def to_env(self) -> str:
        """The settings as JSON, for worker processes started by uvicorn."""
        import json

        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        """The settings a parent process put into LENET_SERVE_SETTINGS."""
        import json

        return cls(**json.loads(os.environ[SETTINGS_ENV]))


# Each reading process holds its own interpreter and model (about 100 MB with onnxruntime,
# more with PyTorch): a large machine is better served with --workers as well.
MAX_DEFAULT_READERS = 4


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity (taskset, cpusets), and a cgroup v2
    CPU quota (docker --cpus, Kubernetes limits; ``cpu_max``), which affinity does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cores


def default_readers(workers: int) -> int:
    """Readers per worker: the usable cores shared among the workers, at most
    MAX_DEFAULT_READERS."""
    return max(1, min(usable_cores() // workers, MAX_DEFAULT_READERS))


def serving_backend(settings: ServeSettings) -> str:
    """The backend to serve with: ``auto`` as for every command (``command_line_backend``)."""
    from lenet.backends import command_line_backend

    return command_line_backend(settings.weights, settings.backend)


class HeadAsGet:
    """HEAD answered as GET, without the body: monitors and uptime checkers often ask with
    HEAD, and FastAPI's routes answer only the methods they list."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class NotAvailable(LenetError):
    """A route this installation cannot answer (a missing optional dependency)."""

    status = 501


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status, headers=headers)


class Service:
    """What the routes share: the recognizer, the readers, the limits, the metrics."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: ServiceMetrics,
        recognizer: Recognizer | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.preloaded = recognizer
        self.recognizer: Recognizer | None = None
        self.explain_weights: Any = None  # PyTorch weights for /v1/explain, loaded when asked
        self.ready_error: str | None = "starting"
        # Loading, and explaining (rare, and it needs this process's PyTorch weights).
        self.pool = ThreadPoolExecutor(settings.readers, thread_name_prefix="lenet-work")
        self.readers: ThreadReaders | ProcessReaders | None = None
        self.pending = 0
        self.lock = threading.Lock()

    def load(self) -> None:
        """Load the model and check that it answers (the self-test /readyz reports)."""
        recognizer = self.preloaded or Recognizer.load(
            self.settings.weights, backend=serving_backend(self.settings)
        )
        torch = sys.modules.get("torch")
        if torch is not None:
            # Parallelism comes from the readers; a single image gains nothing from more
            # threads, and two threads each starting an OpenMP team oversubscribe the cores
            # and wait on each other.
            torch.set_num_threads(1)
        recognizer.max_pixels = self.settings.max_pixels
        self.ready_error = self_test(recognizer)
        if self.ready_error is not None:
            log.error("lenet serve: %s", self.ready_error)
        self.recognizer = recognizer

    async def start_readers(self) -> None:
        """Start the readers (after ``load``): threads at once, processes once each has
        loaded the model and passed the self-test."""
        recognizer = self.recognizer
        if recognizer is None:
            return
        reading = self.settings.reading
        if reading == "processes" and sys.platform == "win32":
            # Windows' event loop cannot watch pipes (loop.add_reader), which the reading
            # processes are driven by.
            log.warning("lenet serve: reading in threads (reading processes need Linux or macOS)")
            reading = "threads"
        if reading == "threads":
            self.readers = ThreadReaders(recognizer, self.settings.readers)
            return

        def changed(serving: int, died: bool) -> None:
            self.metrics.readers.set(serving)
            if died:
                self.metrics.reader_restarts.inc()

        readers = ProcessReaders(
            self.settings.weights,
            recognizer.backend_name,
            self.settings.max_pixels,
            self.settings.readers,
            on_change=changed,
        )
        failure = await readers.start()
        self.readers = readers
        if failure is not None and self.ready_error is None:
            self.ready_error = failure
            log.error("lenet serve: %s", failure)

    def problem(self) -> str | None:
        """Why the service cannot answer now, or None (what /readyz reports)."""
        if self.ready_error is not None or self.recognizer is None:
            return self.ready_error or "starting"
        return self.readers.problem() if self.readers is not None else "starting"

    def close(self) -> None:
        if self.readers is not None:
            self.readers.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, start: Callable[[float], Future[Any] | asyncio.Future[Any]]) -> Any:
        """The result of the work ``start(deadline)`` submits, within the pending limit and
        the time limit. Work answers None when it was skipped for being too late."""
        if self.recognizer is None:
            raise Busy("The model is still loading; retry in a moment.")
        with self.lock:
            if self.pending >= self.settings.max_pending:
                raise Busy(f"{self.pending} requests are already waiting; retry in a moment.")
            self.pending += 1
        deadline = time.monotonic() + self.settings.timeout_s
        try:
            future = start(deadline)
        except BaseException:
            self._finished()
            raise
        future.add_done_callback(self._finished)
        too_late = Busy(f"The answer took longer than {self.settings.timeout_s:g} s; retry later.")
        try:
            result = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), self.settings.timeout_s
            )
        except asyncio.TimeoutError:
            raise too_late from None
        if result is None:
            raise too_late
        return result

    def _finished(self, _: object = None) -> None:
        with self.lock:
            self.pending -= 1

    async def read(self, kind: str, data: bytes, include_input: bool) -> dict[str, Any]:
        """The answer of /v1/predict or /v1/read for ``data``, counted in the metrics."""
        readers = self.readers
        if readers is None:
            raise Busy("The model is still loading; retry in a moment.")
        out, counted = await self.run(
            lambda deadline: readers.submit(kind, data, include_input, deadline)
        )
        # Counted here: a reading process has no access to these metrics.
        for digit, reason in counted:
            self.metrics.count_answer(digit, reason)
        return out


def _exported_from(backend: Any) -> str:
    """The weights file an ONNX model was exported from, or NotAvailable saying where to
    put it."""
    found = backend.source_weights()
    if found is None:
        source = (backend.metadata.get("source") or {}).get("weights", "its .safetensors")
        raise NotAvailable(
            f"Explaining needs the PyTorch weights {backend.path.name} was exported from "
            f"({source}), which are neither beside it nor bundled. Put them beside the .onnx "
            "file, or serve them with --weights FILE.safetensors --backend torch."
        )
    return str(found)


def _static_dir() -> str:
    return str(importlib.resources.files("lenet") / "server" / "static")


def page_url(host: str, port: int) -> str:
    """The drawing page's address (an IPv6 host in brackets, as URLs want it)."""
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def ready_line(model: str, host: str, port: int) -> str:
    """What `lenet serve` prints once it answers: the model and where to find the page."""
    url = page_url(host, port)
    return f"lenet serve: model {model} ready; drawing page at {url} (API docs at {url}docs)"


def create_app(
    settings: ServeSettings | None = None,
    recognizer: Recognizer | None = None,
    announce: bool = False,
) -> FastAPI:
    """The service as an ASGI app (uvicorn, or any ASGI server or test client).

    ``recognizer``: one already loaded (`lenet serve` loads it first, so that a wrong
    --weights is reported before the server starts); otherwise it is loaded at start-up.
    Reading processes load their own from ``settings.weights`` (on the recognizer's backend),
    so a recognizer given here must come from those settings; with ``reading="threads"`` it
    is the one that reads.
    ``announce``: print ``ready_line`` once the model is loaded, for servers whose socket is
    already bound by then (uvicorn's workers); `lenet serve` with one process prints it itself
    after binding (lenet.server.runner).
    """
    settings = settings or ServeSettings()
    metrics = ServiceMetrics()
    service = Service(settings, metrics, recognizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.get_running_loop().run_in_executor(service.pool, service.load)
        await service.start_readers()
        freeze_loaded_objects()
        if announce and service.ready_error is None and service.recognizer is not None:
            print(ready_line(service.recognizer.name, settings.host, settings.port), flush=True)
        try:
            yield
        finally:
            service.close()

    # FastAPIOffline: FastAPI whose /docs loads Swagger UI from files in the fastapi-offline
    # package instead of a CDN, so the docs work without the internet. No ReDoc page: its
    # script fetches a logo from the internet.
    app = FastAPIOffline(
        redoc_url=None,
        title="lenet",
        version=__version__,
        description="Read handwritten digits in pictures with LeNet. Send a picture as a "
        "multipart form field `image` or as a raw body with an image content type.",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(LenetError)
    async def lenet_error(request: Request, exc: LenetError) -> JSONResponse:
        status = getattr(exc, "status", 400)
        reason = getattr(exc, "reason", None)
        if reason is not None:
            metrics.rejected.labels(reason=reason).inc()
        headers = {"Retry-After": "1"} if status == 503 else None
        return _error(status, str(exc), headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"No such page: {request.url.path}. The API is described at /docs."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs."
        # Starlette's headers (the Allow list of a 405) go out with our JSON.
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error(422, f"Invalid request: {problems}. See /docs.")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("lenet serve: unexpected error on %s", request.url.path)
        return _error(500, f"Internal error ({type(exc).__name__}); it has been logged.")

    async def answer(request: Request, kind: str, include_input: bool) -> Any:
        data = await read_upload(request, settings.max_upload_bytes, settings.timeout_s)
        return JSONResponse(await service.read(kind, data, include_input))

    @app.post(
        "/v1/predict",
        summary="The digit in one picture",
        description="The same JSON as `lenet predict --json` (without `file`). With "
        "`include_input=true`, also the 28x28 picture the model saw, as a PNG data URL.",
        response_model=schemas.PredictionOut,
        responses=schemas.ERROR_RESPONSES,
        openapi_extra=schemas.UPLOAD_BODY,
    )
    async def predict(request: Request, include_input: bool = False) -> Any:
        return await answer(request, "predict", include_input)

    @app.post(
        "/v1/read",
        summary="The digits in a line of handwriting, left to right",
        description="The same JSON as `lenet predict --multi --json` (without `file`).",
        response_model=schemas.ReadingOut,
        responses=schemas.ERROR_RESPONSES,
        openapi_extra=schemas.UPLOAD_BODY,
    )
    async def read(request: Request, include_input: bool = False) -> Any:
        return await answer(request, "read", include_input)

    def explain_one(data: bytes, recognizer: Recognizer, deadline: float) -> Any:
        if time.monotonic() > deadline:
            return None  # its client has been answered 503 already
        try:
            from lenet.explain import explain
        except ImportError as exc:
            raise NotAvailable(
                f"Explaining needs PyTorch, which this installation lacks ({exc.name} "
                "is missing): pip install torch, or use /v1/predict."
            ) from None
        weights = service.explain_weights
        if weights is None:
            # Saliency needs gradients, so the PyTorch weights the model came from are used
            # even when answers come from onnxruntime: the very weights it was exported from
            # (checked by their SHA-256), never another model's.
            backend_weights = getattr(recognizer.backend, "weights", None)
            if backend_weights is None:
                from lenet.weights import load_weights

                backend_weights = load_weights(_exported_from(recognizer.backend))
            weights = service.explain_weights = backend_weights
        return explain(data, weights, settings.max_pixels).to_dict()

    @app.post(
        "/v1/explain",
        summary="What the network sees: its input, filters, feature maps and a saliency map",
        description="The same JSON as `lenet explain --json` (without `file`): every picture "
        "is a base64 PNG at its true size. 422 when the picture holds no digit.",
        responses={**schemas.ERROR_RESPONSES, **schemas.NOT_AVAILABLE},
        openapi_extra=schemas.UPLOAD_BODY,
    )
    async def explain_route(request: Request) -> Any:
        data = await read_upload(request, settings.max_upload_bytes, settings.timeout_s)
        recognizer = service.recognizer
        if recognizer is None:
            raise Busy("The model is still loading; retry in a moment.")
        result = await service.run(
            lambda deadline: service.pool.submit(explain_one, data, recognizer, deadline)
        )
        return JSONResponse(result)

    @app.get("/v1/models", summary="The bundled models and their model cards")
    def models() -> schemas.ModelsOut:
        from lenet.weights import bundled_weights, read_card

        recognizer = service.recognizer
        loaded = recognizer.name if recognizer else None
        serving = (
            schemas.ModelOut(name=recognizer.name, card=recognizer.card) if recognizer else None
        )
        listed = [
            schemas.ModelOut(name=name, card=read_card(path))
            for name, path in bundled_weights().items()
        ]
        backend = recognizer.backend_name if recognizer else settings.backend
        return schemas.ModelsOut(loaded=loaded, serving=serving, backend=backend, models=listed)

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/readyz",
        summary="The model is loaded and passed its self-test",
        responses={503: {"model": schemas.ErrorOut, "description": "not ready: why not"}},
    )
    async def readyz() -> JSONResponse:
        problem = service.problem()
        if problem is not None or service.recognizer is None:
            return _error(503, f"Not ready: {problem}.")
        return JSONResponse({"status": "ready", "model": service.recognizer.name})

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text exposition format)",
        response_class=PlainTextResponse,
    )
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(os.path.join(_static_dir(), "index.html"))

    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(HeadAsGet)  # added last: the outermost, so metrics count it as GET
    return app


def create_app_from_env() -> FastAPI:
    """The app factory uvicorn's worker processes call (`lenet serve --workers N`)."""
    keep_freed_memory()
    quiet_bad_input_noise()
    return create_app(ServeSettings.from_env(), announce=True)
