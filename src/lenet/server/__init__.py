"""`lenet serve`: the HTTP API over the Recognizer and the drawing page (the `serve` extra)."""

from lenet.server.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
