"""The service's Prometheus metrics: requests, latency, predictions and rejected inputs.

Each app gets its own registry, so several apps (tests) can live in one process. With
several worker processes (`lenet serve --workers N`), PROMETHEUS_MULTIPROC_DIR is set before
the workers start and a scrape sums every worker's files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.routing import Match, Mount

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Milliseconds matter here: a digit is answered in a few ms, a slow one in tens.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ServiceMetrics:
    """The counters and histograms of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lenet_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lenet_http_request_duration_seconds",
            "Time from the request's arrival to the end of the answer.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "lenet_predictions",
            "Digits answered: 0-9, 'unsure' (below the confidence threshold) or 'none'.",
            ["digit"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "lenet_rejected_inputs",
            "Uploads refused, by reason (too_large, too_many_pixels, unsupported_format, "
            "undecodable, bad_request, no_digit, upload_stalled, client_disconnected, busy).",
            ["reason"],
            registry=self.registry,
        )
        # With --workers N, each worker's value is summed (of the workers alive).
        self.readers = Gauge(
            "lenet_reading_processes",
            "Reading processes serving (lenet serve --reading processes); 0 in threads mode.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.reader_restarts = Counter(
            "lenet_reading_process_restarts",
            "Reading processes that stopped unexpectedly (killed, out of memory) and were "
            "replaced.",
            registry=self.registry,
        )

    def count_answer(self, digit: int | None, reason: str | None) -> None:
        """Count one answered digit."""
        label = str(digit) if digit is not None else ("none" if reason != "unsure" else "unsure")
        self.predictions.labels(digit=label).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text a Prometheus scrape gets, and its content type."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not its raw path, so that
    random URLs cannot blow up the number of series)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        root_path = scope.get("root_path", "")  # a mount that answers extends it
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            template = _template(scope, root_path)
            labels = {"route": template, "method": scope["method"], "status": str(status)}
            self.metrics.requests.labels(**labels).inc()
            self.metrics.latency.labels(**labels).observe(time.perf_counter() - start)


def _template(scope: Scope, root_path: str) -> str:
    """The template of the route that answered a request, or "unmatched" (a 404).

    FastAPI's routes note themselves in the scope. Starlette's own do not: the docs pages,
    /openapi.json, and the mounts of static files, which count as "/static/{path}"; those are
    matched again here, on the scope as it came in (``root_path`` before a mount extended
    it), which costs nothing on the API's routes.
    """
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    incoming = {**scope, "root_path": root_path}
    for route in getattr(getattr(scope.get("app"), "router", None), "routes", ()):
        if route.matches(incoming)[0] is Match.FULL:
            return f"{route.path}/{{path}}" if isinstance(route, Mount) else route.path
    return "unmatched"
