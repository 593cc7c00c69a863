"""Trained weights on disk: a ``.safetensors`` file with a JSON model card beside it.

The card travels with the weights and says everything needed to use them correctly: which
model to build, how to normalise its input, what data it was trained on and how well it does.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenet.atomic import write_bytes_atomic, write_text_atomic
from lenet.errors import WeightsError

# torch, safetensors and the models are imported where they are used: finding and reading
# cards must work in a serving install without torch (the onnxruntime backend).
if TYPE_CHECKING:
    import torch

    from lenet.models import Normalization


def card_path(weights_path: str | os.PathLike[str]) -> Path:
    """The model card that belongs to a weights file: same name, ``.json``."""
    return Path(weights_path).with_suffix(".json")


def save_weights(
    path: str | os.PathLike[str], model: torch.nn.Module, card: dict[str, Any]
) -> Path:
    """Write the model's state as safetensors and its card as JSON, each atomically."""
    from safetensors.torch import save

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
        """The input normalisation these weights were trained with."""
        from lenet.models import Normalization

        norm = self.card["normalization"]
        return Normalization(float(norm["mean"]), float(norm["std"]))

    @property
    def name(self) -> str:
        """The registered model name."""
        return str(self.card["model"])

    @property
    def temperature(self) -> float:
        """The softmax temperature fitted on the validation split (1.0 if never fitted)."""
        return float(self.card.get("temperature") or 1.0)


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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, hex: ties an export to the exact weights it came from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def bundled_weights() -> dict[str, Path]:
    """The pretrained weights shipped inside the package: name -> .safetensors path."""
    folder = importlib.resources.files("lenet") / "pretrained"
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".safetensors"):
            found[entry.name.removesuffix(".safetensors")] = Path(str(entry))
    return dict(sorted(found.items()))


def best_bundled() -> str:
    """The name of the most accurate bundled model (by the test accuracy on its card)."""
    bundled = bundled_weights()
    if not bundled:
        raise WeightsError("This installation has no bundled weights; pass --weights FILE.")
    return max(bundled, key=lambda name: read_card(bundled[name]).get("test_accuracy") or 0)


# What `lenet export` writes, by suffix: files that hold a model, but not the weights PyTorch
# loads.
EXPORTED_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}


# What `lenet train` writes in a run's folder when the run ends.
RUN_WEIGHTS_NAME = "model.safetensors"
# And what it keeps there while it runs (lenet.checkpoint writes it; named here, where finding
# a run's files needs no torch).
CHECKPOINT_NAME = "checkpoint.pt"


def run_weights(folder: Path) -> Path:
    """The weights a finished run of `lenet train` wrote in ``folder``."""
    weights = folder / RUN_WEIGHTS_NAME
    if weights.is_file():
        return weights
    hint = (
        f"the run has not finished: finish it with `lenet train --resume --out {folder}`"
        if (folder / CHECKPOINT_NAME).is_file()
        else "it is not a run folder written by `lenet train`"
    )
    raise WeightsError(f"{folder} holds no {RUN_WEIGHTS_NAME}: {hint}, or give a weights file.")


def resolve_weights(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A weights file from a path, a run folder of `lenet train`, a bundled model's name, or
    None for the best bundled one."""
    bundled = bundled_weights()
    if name_or_path is None:
        return bundled[best_bundled()]
    path = Path(name_or_path)
    # A bundled model's bare name wins over a folder of that name where lenet is run (a
    # clone called lenet); ./lenet names the folder.
    bare = not any(sep in str(name_or_path) for sep in ("/", os.sep))
    if str(name_or_path) in bundled and bare and not path.is_file():
        return bundled[str(name_or_path)]
    if path.is_dir():
        path = run_weights(path)
    if path.is_file():
        from lenet.preprocess import IMAGE_SUFFIXES  # pictures given as weights by mistake

        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise WeightsError(
                f"{path} is a picture, not model weights. To read the digit in it: "
                f"`lenet predict {path}`; weights are a bundled model's name, a .safetensors "
                "file or a run folder."
            )
        if path.name == CHECKPOINT_NAME:
            # Also a .pt file, but no export: what --resume continues from.
            raise WeightsError(
                f"{path} is the training checkpoint of a run (what `lenet train --resume` "
                f"continues from), not its weights: give the run folder {path.parent} or its "
                f"{RUN_WEIGHTS_NAME}, written when the run ends."
            )
        kind = EXPORTED_SUFFIXES.get(path.suffix.lower())
        if kind == "onnx":
            raise WeightsError(
                f"{path} is an exported model (ONNX); this needs the PyTorch weights "
                "(.safetensors) it was exported from. (`lenet predict --backend onnx` and "
                "`lenet serve --backend onnx` run .onnx files.)"
            )
        if kind == "torchscript":
            raise WeightsError(
                f"{path} is an exported model (TorchScript), for your own programs "
                "(`torch.jit.load`); lenet reads with the PyTorch weights (.safetensors) it was "
                "exported from, or with an ONNX export (`lenet export WEIGHTS --out model.onnx`)."
            )
        if path.suffix.lower() == ".json" and path.with_suffix(".safetensors").is_file():
            raise WeightsError(
                f"{path} is the model card; the weights are beside it: "
                f"{path.with_suffix('.safetensors')}."
            )
        if path.suffix.lower() != ".safetensors" and not card_path(path).is_file():
            raise WeightsError(
                f"{path} is not model weights: weights are a bundled model's name, a "
                ".safetensors file with its model card (.json) beside it, or the run folder "
                "written by `lenet train`."
            )
        return path
    names = ", ".join(bundled) or "none"
    raise WeightsError(
        f"{name_or_path} is neither a weights file nor a bundled model (bundled: {names}). "
        "Give the path of a .safetensors file or the run folder written by `lenet train`."
    )


def load_weights(
    name_or_path: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu"
) -> LoadedWeights:
    """Build the model named by the card, load the weights, switch to eval mode.

    ``name_or_path`` is a .safetensors file, the name of a bundled model, or None for the most
    accurate bundled model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_weights(name_or_path)
    card = read_card(path)
    model = _build_for_card(card, path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({exc}). Re-train or re-copy it."
        ) from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{path} does not fit the model {card['model']!r} named by its card: {exc}"
        ) from exc
    return LoadedWeights(model.to(device).eval(), card, path)


def _build_for_card(card: dict[str, Any], path: Path) -> torch.nn.Module:
    """A freshly initialised model of the architecture a card names (a model or an ensemble).

    Unknown model names give a clear error (a model this version does not know).
    """
    from lenet.models import ENSEMBLE, create_ensemble, create_model, get_model_spec

    if card["model"] != ENSEMBLE:
        get_model_spec(card["model"])
        return create_model(card["model"])
    members = card.get("members")
    if not isinstance(members, list) or not members:
        raise WeightsError(
            f"The model card {card_path(path)} describes an ensemble but lists no members. "
            "Build it again with `lenet ensemble WEIGHTS... --out FILE`."
        )
    names = [str(member.get("model")) for member in members]
    for name in names:
        get_model_spec(name)
    return create_ensemble(names)
