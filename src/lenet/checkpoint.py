"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Checkpoints hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(weights_only=True)`` and never execute code from the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from lenet.atomic import write_bytes_atomic
from lenet.errors import RunDirError
from lenet.weights import CHECKPOINT_NAME  # noqa: F401  (the run folder's names live there)

# What every checkpoint lenet train writes holds (a file without them is no run's state).
CHECKPOINT_KEYS = frozenset(
    ("config", "model", "optimizer", "scheduler", "rng", "epoch", "next_batch", "running",
     "history", "train_seconds")
)  # fmt: skip


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Serialise ``state`` and replace the file at ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (safely: weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(
            f"There is no checkpoint at {path}: nothing to resume. Start a new run instead "
            "(without --resume)."
        )
    unusable = RunDirError(
        f"The checkpoint {path} is damaged or not one lenet wrote: it cannot be resumed. Start "
        "the run again with --force (or from another --out)."
    )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        # Not torch's own words: they advise weights_only=False, which would run code from
        # the file, and filing an issue with PyTorch; neither helps here.
        raise unusable from exc
    if not isinstance(loaded, dict) or not CHECKPOINT_KEYS <= loaded.keys():
        raise unusable
    return loaded
