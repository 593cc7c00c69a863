"""Trained weights on disk: a ``.safetensors`` file with a JSON model card beside it.

The card travels with the weights and says everything needed to use them correctly: which
model to build, how to normalise its input, what data it was trained on and how well it does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lenet.atomic import write_bytes_atomic, write_text_atomic
from lenet.errors import WeightsError
from lenet.models import Normalization, create_model, get_model_spec


def card_path(weights_path: str | os.PathLike[str]) -> Path:
    """The model card that belongs to a weights file: same name, ``.json``."""
    return Path(weights_path).with_suffix(".json")


def save_weights(
    path: str | os.PathLike[str], model: torch.nn.Module, card: dict[str, Any]
) -> Path:
    """Write the model's state as safetensors and its card as JSON, each atomically."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_bytes_atomic(path, save(state, metadata={"model": str(card["model"])}))
    write_text_atomic(card_path(path), json.dumps(card, indent=2, sort_keys=False) + "\n")
    return path


@dataclass
class LoadedWeights:
    """A model ready for inference, with the card it came with."""

    model: torch.nn.Module
    card: dict[str, Any]
    path: Path

    @property
    def normalization(self) -> Normalization:
        norm = self.card["normalization"]
        return Normalization(float(norm["mean"]), float(norm["std"]))

    @property
    def name(self) -> str:
        return str(self.card["model"])


def read_card(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the model card of a weights file."""
    cpath = card_path(path)
    try:
        card = json.loads(cpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(
            f"{path} has no model card: {cpath} is missing. lenet writes it beside every "
            "weights file; copy it along with the weights."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"The model card {cpath} cannot be read: {exc}.") from exc
    for key in ("model", "normalization"):
        if key not in card:
            raise WeightsError(f"The model card {cpath} lacks the field {key!r}.")
    return card


def load_weights(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> LoadedWeights:
    """Build the model named by the card of ``path``, load the weights, switch to eval mode."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {path} does not exist. Give the path of a .safetensors.")
    card = read_card(path)
    get_model_spec(card["model"])  # a clear error for a model this version does not know
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({exc}). Re-train or re-copy it."
        ) from exc
    model = create_model(card["model"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{path} does not fit the model {card['model']!r} named by its card: {exc}"
        ) from exc
    return LoadedWeights(model.to(device).eval(), card, path)
