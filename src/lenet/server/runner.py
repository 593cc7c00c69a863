"""Running the service under uvicorn: one process, or worker processes sharing a socket.

The start-up line (model, page address) is printed only once the port is bound, with the
port actually bound (`--port 0` picks a free one): a script that waits for it can rely on it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import uvicorn

from lenet.allocator import keep_freed_memory
from lenet.recognize import Recognizer
from lenet.server.app import SETTINGS_ENV, ServeSettings, create_app, ready_line
from lenet.server.metrics import MULTIPROC_ENV
from lenet.server.readers import quiet_bad_input_noise


class _AnnouncingServer(uvicorn.Server):
    """uvicorn's server, printing the start-up line after it has bound its socket."""

    def __init__(self, config: uvicorn.Config, model: str) -> None:
        super().__init__(config)
        self.model = model

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:  # uvicorn has bound the port (it exits on a bind error)
            port = self.servers[0].sockets[0].getsockname()[1]
            print(ready_line(self.model, self.config.host, port), flush=True)


def run(settings: ServeSettings, recognizer: Recognizer, workers: int, access_log: bool) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM)."""
    keep_freed_memory()
    quiet_bad_input_noise()
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "access_log": access_log,
        "log_level": "info" if access_log else "warning",
    }
    if workers == 1:
        config = uvicorn.Config(create_app(settings, recognizer), **common)
        _AnnouncingServer(config, recognizer.name).run()
        return
    # Worker processes build their own app from the settings, and share their metrics
    # through files so that any worker's /metrics counts all of them. uvicorn binds the port
    # before it starts them, so each announces itself once its model is loaded.
    os.environ[SETTINGS_ENV] = settings.to_env()
    with tempfile.TemporaryDirectory(prefix="lenet-metrics-") as folder:
        os.environ[MULTIPROC_ENV] = folder
        uvicorn.run("lenet.server.app:create_app_from_env", factory=True, workers=workers, **common)
