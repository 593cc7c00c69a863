"""How long a full garbage collection holds up the service, with and without the freeze.

    python benchmarks/gc_pause.py

Builds the service as `lenet serve` does (in this process; pictures read in threads, so that
everything it loads is here), waits until it is ready, and times `gc.collect()` five times
with what start-up loaded frozen out of collection (what `lenet serve` does once ready,
lenet/allocator.py), and five times without. Every request in flight waits for a full
collection in the server process; the reading processes have the same, smaller, pauses.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time

from fastapi.testclient import TestClient
from machine import cpu_model

from lenet.server import ServeSettings, create_app


def full_collections(times: int = 5) -> list[float]:
    passes = []
    for _ in range(times):
        started = time.perf_counter()
        gc.collect()
        passes.append((time.perf_counter() - started) * 1000)
    return passes


def main() -> None:
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    with TestClient(create_app(ServeSettings(reading="threads"))) as client:
        assert client.get("/readyz").status_code == 200
        frozen = gc.get_freeze_count()
        with_freeze = full_collections()
        gc.unfreeze()
        tracked = len(gc.get_objects())
        without = full_collections()
        gc.freeze()
    print(f"objects frozen once ready: {frozen:,}; tracked without the freeze: {tracked:,}")
    print("| full collection | ms (five passes) | median |\n|---|---|---|")
    for name, passes in (("frozen (lenet serve)", with_freeze), ("not frozen", without)):
        listed = ", ".join(f"{p:.2f}" for p in passes)
        print(f"| {name} | {listed} | {statistics.median(passes):.2f} |")


if __name__ == "__main__":
    main()
