"""Load on `lenet serve`: throughput, latency, memory, and bad uploads mixed into the load.

    python benchmarks/serve_load.py [--seconds 30] [--clients 1,16,64]

Starts `lenet serve` (one worker) on 127.0.0.1 and loads it from this second process with
keep-alive HTTP/1.1 clients (plain asyncio streams: a lean client leaves the cores to the
server). The pictures are 280x280 PNG canvas drawings (dark strokes on a transparent
background, as the drawing page sends) of MNIST *test* digits; every answer is checked.

Prints the machine and versions, then:
  1. the baseline: the same pictures through the Recognizer in one process, no HTTP (and how
     much the pictures differ: each one's best of three readings);
  2. for 1, 16 and 64 clients: requests/s, p50/p95/p99 latency, errors, wrong answers;
  3. memory: the server's resident memory (with its reading processes) after the first
     1,000 and after 20,000 requests;
  4. 16 clients with 10% bad uploads (image bombs, truncated files, wrong content types,
     random bytes): every bad one must be 4xx, every good one still correct, no 5xx;
  5. 16 clients against `lenet serve --reading threads` as it runs and against one left to
     glibc's default allocator behaviour (lenet.allocator), alternated: requests/s and
     page faults;
  6. 16 clients against `lenet serve` reading in processes (the default) and in threads,
     alternated: requests/s and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import userstyle  # noqa: E402
from machine import cpu_model  # noqa: E402
from serving import started_by  # noqa: E402

from lenet.data import load_dataset  # noqa: E402


def canvas_png(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A 280x280 drawing-page export: the digit as dark strokes on transparent pixels."""
    size = int(rng.integers(150, 230))
    ink = Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR)
    alpha = np.zeros((280, 280), np.uint8)
    y, x = rng.integers(0, 280 - size + 1, 2)
    alpha[y : y + size, x : x + size] = np.asarray(ink)
    rgba = np.zeros((280, 280, 4), np.uint8)
    rgba[..., 3] = alpha
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str
    label: int | None  # None: a bad upload that must be refused with 4xx


def bad_uploads(good: bytes, rng: np.random.Generator) -> list[Payload]:
    return [
        Payload(userstyle.png_claiming(60_000, 60_000), "image/png", None),  # image bomb
        Payload(good[: len(good) // 3], "image/png", None),  # truncated
        Payload(b"just some text, not a picture", "image/png", None),
        Payload(good, "text/plain", None),  # wrong content type
        Payload(rng.bytes(2000), "application/octet-stream", None),
    ]


def request_bytes(port: int, payload: Payload) -> bytes:
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {payload.content_type}\r\nContent-Length: {len(payload.body)}\r\n\r\n"
    )
    return head.encode("ascii") + payload.body


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    wrong: int = 0  # good pictures not answered 200 with the right digit (model errors count)
    bad_not_4xx: int = 0  # bad uploads not answered with 4xx
    requests: int = 0


async def client(
    port: int,
    work: list[tuple[bytes, Payload]],
    start: int,
    stop: asyncio.Event,
    tally: Tally,
    budget: list[int],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    k = start
    try:
        while not stop.is_set() and budget[0] > 0:
            budget[0] -= 1
            raw, payload = work[k % len(work)]
            k += 1
            t0 = time.perf_counter()
            writer.write(raw)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            tally.latencies.append(time.perf_counter() - t0)
            status = int(status_line.split()[1])
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            tally.requests += 1
            if payload.label is None:
                tally.bad_not_4xx += not 400 <= status < 500
            elif status != 200 or json.loads(body)["digit"] != payload.label:
                tally.wrong += 1
    finally:
        writer.close()


async def load(
    port: int,
    work: list[tuple[bytes, Payload]],
    clients: int,
    seconds: float,
    max_requests: int = 10**12,
) -> tuple[Tally, float]:
    tally = Tally()
    stop = asyncio.Event()
    budget = [max_requests]
    t0 = time.perf_counter()
    tasks = [
        # Clients start spread over the pictures, so that every picture is asked for.
        asyncio.create_task(client(port, work, i * len(work) // clients, stop, tally, budget))
        for i in range(clients)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), seconds)
    except asyncio.TimeoutError:
        pass
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally, time.perf_counter() - t0


def page_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/PID/stat, field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far, user and system (/proc/PID/stat, fields 14-15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def family_rss_mb(pid: int) -> tuple[float, float]:
    """Resident memory of the server process, and of it with every process it started."""
    own = rss_mb(pid)
    return own, own + sum(rss_mb(child) for child in started_by(pid))


def report(name: str, tally: Tally, elapsed: float) -> None:
    lat = np.array(tally.latencies) * 1000
    p50, p95, p99 = np.percentile(lat, [50, 95, 99]) if len(lat) else (np.nan,) * 3
    errors = sum(n for s, n in tally.statuses.items() if s >= 500)
    print(
        f"| {name} | {tally.requests / elapsed:,.0f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
        f"{tally.requests:,} | {errors} | {tally.wrong} | {tally.bad_not_4xx} |",
        flush=True,
    )


# `lenet serve` as glibc's allocator behaves by default: the baseline of section 5.
DEFAULT_ALLOCATOR = (
    "import sys, lenet.server.runner as r, lenet.cli as c; "
    "r.keep_freed_memory = lambda: False; sys.exit(c.main(sys.argv[1:]))"
)


def start_server(
    port: int,
    workers: int = 1,
    backend: str = "auto",
    default_allocator: bool = False,
    reading: str = "processes",
) -> subprocess.Popen:
    command = ["serve", "--port", str(port), "--workers", str(workers), "--backend", backend]
    command += ["--reading", reading]
    entry = ["-c", DEFAULT_ALLOCATOR] if default_allocator else ["-m", "lenet"]
    server = subprocess.Popen(
        [sys.executable, *entry, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit("lenet serve exited before it was ready") from None
            time.sleep(0.1)
    raise SystemExit("lenet serve was not ready within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per load level")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--pictures", type=int, default=500, help="distinct test pictures")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    parser.add_argument(
        "--reading", default="processes", choices=("processes", "threads"),
        help="how the server reads pictures in sections 2-4 (lenet serve --reading)",
    )  # fmt: skip
    parser.add_argument(
        "--skip-memory",
        action="store_true",
        help="stop after section 2 (skip memory, bad uploads, allocator)",
    )
    args = parser.parse_args()

    import fastapi
    import torch
    import uvicorn

    rng = np.random.default_rng(2026)
    test = load_dataset("mnist").test
    images, labels = test.images[:, 0].numpy(), test.labels.numpy()
    good = [
        Payload(canvas_png(images[i], rng), "image/png", int(labels[i]))
        for i in range(args.pictures)
    ]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(
        f"torch {torch.__version__}, fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}"
    )
    print(f"pictures: {len(good)} 280x280 canvas PNGs, {np.mean([len(p.body) for p in good]):,.0f}"
          " bytes on average")  # fmt: skip

    # 1. Baseline: the same work without HTTP, one thread, in this process.
    from lenet.recognize import Recognizer

    torch.set_num_threads(1)
    from lenet.server.app import ServeSettings, serving_backend

    backend = serving_backend(ServeSettings(backend=args.backend))
    recognizer = Recognizer.load(backend=backend)
    for p in good[:20]:
        recognizer.predict(p.body)
    # Three passes: the first gives the mean and the answers; each picture's best of the three
    # shows how much the pictures themselves differ.
    seconds = np.empty((3, len(good)))
    correct = 0
    for round_ in range(3):
        for i, p in enumerate(good):
            started = time.perf_counter()
            digit = recognizer.predict(p.body).digit
            seconds[round_, i] = time.perf_counter() - started
            correct += round_ == 0 and digit == p.label
    per = float(seconds[0].mean())
    print(f"\nbaseline, no HTTP (Recognizer.predict, {backend} backend, 1 thread): "
          f"{per * 1000:.2f} ms per picture, "
          f"{1 / per:,.0f} pictures/s per core, {correct}/{len(good)} correct")  # fmt: skip
    p5, p50, p95, p100 = np.percentile(seconds.min(axis=0) * 1000, [5, 50, 95, 100])
    print(f"each picture's best of 3 readings: 5th percentile {p5:.2f} ms, median {p50:.2f}, "
          f"95th percentile {p95:.2f}, slowest {p100:.2f}")  # fmt: skip
    del recognizer
    # This process's own full garbage collections (about 100 ms here: it has imported PyTorch
    # and holds MNIST) stopped all 16 clients at once and were counted as the server's
    # latency; what is loaded now is kept out of them, as `lenet serve` does for its own.
    gc.freeze()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(port, args.workers, args.backend, reading=args.reading)
    header = (
        "| load | requests/s | p50 ms | p95 ms | p99 ms | requests | 5xx | misread "
        "| bad not 4xx |\n|---|---|---|---|---|---|---|---|---|"
    )
    try:
        work = [(request_bytes(port, p), p) for p in good]
        asyncio.run(load(port, work, 4, 3.0))  # warm-up
        print(
            f"\n2. good canvas PNGs, {args.workers} worker(s), backend {args.backend}, "
            f"reading in {args.reading}\n" + header
        )
        for clients in (int(c) for c in args.clients.split(",")):
            tally, elapsed = asyncio.run(load(port, work, clients, args.seconds))
            report(f"{clients} clients, {args.seconds:g} s", tally, elapsed)

        if args.skip_memory or args.workers > 1:
            return
        print("\n3. memory (16 clients): resident memory of the server (and its readers)")
        server.terminate()
        server.wait(10)
        server = start_server(port, args.workers, args.backend, reading=args.reading)
        asyncio.run(load(port, work, 16, 600, max_requests=1000))
        first, first_all = family_rss_mb(server.pid)
        asyncio.run(load(port, work, 16, 600, max_requests=19_000))
        last, last_all = family_rss_mb(server.pid)
        for name, a, b in (("server process", first, last), ("with its readers", first_all,
                                                              last_all)):  # fmt: skip
            print(f"{name}: after 1,000 requests: {a:.1f} MB; after 20,000: {b:.1f} MB "
                  f"({100 * (b - a) / a:+.1f}%; target within 10%)")  # fmt: skip

        print("\n4. 16 clients, 10% bad uploads\n" + header)
        bad = bad_uploads(good[0].body, rng)
        mixed = []
        for k, p in enumerate(good):
            mixed.append((request_bytes(port, p), p))
            if k % 9 == 8:  # one bad after every nine good: 10%
                b = bad[(k // 9) % len(bad)]
                mixed.append((request_bytes(port, b), b))
        tally, elapsed = asyncio.run(load(port, mixed, 16, args.seconds))
        report(f"16 clients, 10% bad, {args.seconds:g} s", tally, elapsed)
        print("statuses:", dict(sorted(tally.statuses.items())))

        # lenet serve keeps freed memory for reuse (lenet.allocator); the same load on
        # a server left to glibc's defaults, alternated to share the machine's slow and fast
        # minutes.
        print(
            "\n5. 16 clients, 15 s each, alternating: lenet serve --reading threads as it runs, "
            "and with glibc's default allocator behaviour\n"
            "| allocator | requests/s | p50 ms | p99 ms | page faults per request |\n"
            "|---|---|---|---|---|"
        )
        # A-B then B-A: a drift of the machine's speed over the four runs favours neither.
        for order in ((True, False), (False, True)):
            for default in order:
                server.terminate()
                server.wait(10)
                server = start_server(port, args.workers, args.backend, default, "threads")
                asyncio.run(load(port, work, 4, 2.0))  # warm-up
                faults = page_faults(server.pid)
                tally, elapsed = asyncio.run(load(port, work, 16, 15.0))
                per = (page_faults(server.pid) - faults) / max(tally.requests, 1)
                lat = np.array(tally.latencies) * 1000
                name = "glibc default" if default else "kept for reuse (lenet serve)"
                print(
                    f"| {name} | {tally.requests / elapsed:,.0f} | {np.percentile(lat, 50):.1f} "
                    f"| {np.percentile(lat, 99):.1f} | {per:,.1f} |",
                    flush=True,
                )

        print(
            "\n6. 16 clients, 15 s each, alternating: reading in processes (lenet serve's "
            "default) and in threads (--reading threads); CPU a request: the server process's, "
            "its readers' and this load client's\n| reading | requests/s | p50 ms | p95 ms "
            "| p99 ms | 5xx | misread | server CPU ms | readers' CPU ms | client CPU ms |\n"
            "|---|---|---|---|---|---|---|---|---|---|"
        )
        for order in (("processes", "threads"), ("threads", "processes")):
            for reading in order:
                server.terminate()
                server.wait(10)
                server = start_server(port, args.workers, args.backend, reading=reading)
                asyncio.run(load(port, work, 4, 2.0))  # warm-up
                readers = [pid for pid in started_by(server.pid) if "spawn_main" in
                           Path(f"/proc/{pid}/cmdline").read_text()]  # fmt: skip
                before = [cpu_seconds(pid) for pid in [server.pid, *readers]]
                own = time.process_time()
                tally, elapsed = asyncio.run(load(port, work, 16, 15.0))
                own = time.process_time() - own
                after = [cpu_seconds(pid) for pid in [server.pid, *readers]]
                used = [1000 * (b - a) / max(tally.requests, 1) for a, b in zip(before, after)]
                lat = np.array(tally.latencies) * 1000
                p50, p95, p99 = np.percentile(lat, [50, 95, 99])
                errors = sum(n for s, n in tally.statuses.items() if s >= 500)
                print(
                    f"| {reading} | {tally.requests / elapsed:,.0f} | {p50:.1f} | {p95:.1f} "
                    f"| {p99:.1f} | {errors} | {tally.wrong} | {used[0]:.2f} | "
                    f"{sum(used[1:]):.2f} | {1000 * own / max(tally.requests, 1):.2f} |",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
