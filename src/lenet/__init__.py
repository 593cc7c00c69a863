"""lenet: LeNet for handwritten digits.

The public API is imported lazily so that ``import lenet`` (and ``lenet --help``) stays quick
and does not load PyTorch until a function that needs it is called.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "lenet.models",
    "list_models": "lenet.models",
    "load_dataset": "lenet.data",
    "TrainConfig": "lenet.config",
    "resolve_config": "lenet.config",
    "train": "lenet.training",
    "evaluate": "lenet.evaluation",
    "load_weights": "lenet.weights",
    "Recognizer": "lenet.recognize",
    "Prediction": "lenet.recognize",
    "Reading": "lenet.recognize",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lenet' has no attribute {name!r}")
