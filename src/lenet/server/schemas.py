"""The shapes of the service's answers, as the OpenAPI page at /docs shows them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class PredictionOut(BaseModel):
    """One digit: the same JSON as `lenet predict --json`, without `file`."""

    digit: int | None = Field(
        description="0-9; null when no digit was found or the model is unsure"
    )
    confidence: float = Field(description="calibrated probability of the best guess; 0 if none")
    probabilities: list[float] = Field(description="ten calibrated probabilities, digits 0-9")
    reason: str | None = Field(
        None, description="present when digit is null: 'no digit found' or 'unsure'"
    )
    best_guess: int | None = Field(None, description="present when digit is null")
    others: int | None = Field(
        None,
        description="present when the picture holds other digits beside this one, which were "
        "left out: how many (POST /v1/read reads them all)",
    )
    input: str | None = Field(
        None, description="with include_input=true: the 28x28 image the model saw (PNG data URL)"
    )


class DigitOut(BaseModel):
    """One digit of a line."""

    digit: int | None = Field(description="0-9; null when the model is unsure")
    confidence: float
    box: list[int] | None = Field(description="[x0, y0, x1, y1] in the picture's pixels")
    best_guess: int | None = Field(None, description="present when digit is null")
    input: str | None = Field(None, description="with include_input=true: the 28x28 image")


class ReadingOut(BaseModel):
    """A line of digits: the same JSON as `lenet predict --multi --json`, without `file`."""

    text: str | None = Field(description="the digits left to right; null if any is unsure")
    digits: list[DigitOut]


class ModelOut(BaseModel):
    """A bundled model and its card (architecture, data, recipe, accuracy, command)."""

    name: str
    card: dict[str, Any]


class ModelsOut(BaseModel):
    """The bundled models, and the one this service answers with."""

    loaded: str | None  # the served model's architecture name (None while it loads)
    # The served model with the card of its weights: a bundled model's, or that of the
    # weights given to `lenet serve --weights` (which `loaded` alone would not tell apart).
    serving: ModelOut | None
    backend: str
    models: list[ModelOut]


class ErrorOut(BaseModel):
    """Every error: what was wrong and what to do, with the HTTP status repeated."""

    error: str
    status: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    408: {"model": ErrorOut, "description": "the upload stopped arriving"},
    413: {"model": ErrorOut, "description": "upload or picture too large"},
    415: {"model": ErrorOut, "description": "not an accepted image format"},
    422: {"model": ErrorOut, "description": "empty, undecodable, or no `image` field"},
    503: {"model": ErrorOut, "description": "busy or too slow: retry later"},
}

# /v1/explain on an installation without PyTorch (or without the weights an .onnx came from).
NOT_AVAILABLE: dict[int | str, dict[str, Any]] = {
    501: {"model": ErrorOut, "description": "not available in this installation: what is missing"}
}

_BINARY = {"type": "string", "format": "binary"}
# The body is read by hand (to enforce the size limit while reading), so it is described here.
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A PNG, JPEG, BMP, GIF, WebP or TIFF picture.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": _BINARY},
                    "required": ["image"],
                }
            },
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}
