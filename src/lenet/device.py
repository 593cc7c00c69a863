"""Choosing where to compute, once per entry point; everything below receives the result."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lenet.errors import ConfigError

if TYPE_CHECKING:  # imported where used, so that `lenet --help` needs no torch
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a device that exists on this machine."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        raise ConfigError(f"Unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for, but this PyTorch build sees no CUDA GPU "
            f"(torch {torch.__version__}). Use --device cpu, or install a CUDA build of torch."
        )
    if kind == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError("--device mps was asked for, but MPS is not available here.")
    return torch.device(name)


def configure_threads(threads: int | None) -> int:
    """Set PyTorch's intra-op thread count (default: every core this process may use)."""
    import torch

    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}.")
    torch.set_num_threads(threads)
    return threads
