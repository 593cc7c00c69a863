"""`lenet serve`: the HTTP API over the Recognizer and the drawing page (the `serve` extra).

The names below are imported when first used: a reading process (lenet.server.readers)
imports this package too, and needs none of the web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lenet.server.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lenet.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'lenet.server' has no attribute {name!r}")
