"""The engines behind the Recognizer: PyTorch, or onnxruntime for a serving install without torch.

Both take the (N, 28, 28) uint8 images that ``lenet.preprocess`` makes and return (N, 10) float32
logits; the Recognizer turns either into calibrated probabilities the same way (the card's
temperature, then softmax), so the two backends give the same answers. This module imports
neither torch nor onnxruntime at import time: each backend imports its own library when it is
built, so a serving install needs only the one it uses.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lenet.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    import torch

    from lenet.weights import LoadedWeights

BACKENDS = ("auto", "torch", "onnx")
# Exported files carry one JSON object under this key (ONNX metadata_props, TorchScript
# _extra_files): the model card and the input contract, so a file is never paired with the
# wrong preprocessing.
METADATA_KEY = "lenet"
METADATA_VERSION = 1
# onnxruntime is fastest on this network in chunks that stay in the CPU's cache: one call on
# 10,000 images ran at half the speed of calls on 256 (benchmarks/inference_speed.py).
ONNX_CHUNK = 256
# The torch backend's chunks: lenet-relu through lenet's compiled stages ran at 117,000-119,000
# images/s in chunks of 4,000 against 100,000-102,000 in one call on 10,000 (the first stage's
# maps of 10,000 images are 35 MB), and the tutorial's lenet as fast either way (ad-hoc sweep of
# 10,000, 4,000, 2,000 and 1,000, alternated, two runs); a chunk also bounds the memory.
TORCH_CHUNK = 4000


class Backend(Protocol):
    """What the Recognizer needs from an engine."""

    card: dict[str, Any]
    path: Path

    @property
    def name(self) -> str: ...

    @property
    def temperature(self) -> float: ...

    def logits(self, images: np.ndarray) -> np.ndarray: ...


def normalize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32 model inputs, ``(pixel / 255 - mean) / std``.

    The same arithmetic, in the same order and precision, as ``lenet.models.Normalization``, so
    both backends see bit-identical inputs.
    """
    scale = 1.0 / (255.0 * std)
    out = images.astype(np.float32)[:, None]
    out *= np.float32(scale)
    out -= np.float32(mean / std)
    return out


def temperature_of(card: dict[str, Any]) -> float:
    """The softmax temperature on a card (1.0 when none was fitted)."""
    return float(card.get("temperature") or 1.0)


class TorchModel:
    """PyTorch weights (a .safetensors file and its card) behind the Backend face."""

    def __init__(self, weights: LoadedWeights) -> None:
        self.weights = weights
        self.card = weights.card
        self.path = weights.path

    @property
    def name(self) -> str:
        """The registered model name."""
        return self.weights.name

    @property
    def temperature(self) -> float:
        """The card's softmax temperature."""
        return temperature_of(self.card)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, 10) float32 logits for (N, 28, 28) uint8 images."""
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
            model = self.weights.model
            device = next(model.parameters()).device
            norm = self.weights.normalization
            # The model's cheaper order: on a CPU, lenet's compiled stages where they cover it
            # (the tutorial's lenet, and lenet-relu with its BatchNorm folded into them), the
            # same logits to float32 rounding; 115,000 (lenet-relu) and 99,000 (lenet) images/s
            # against 16,000 and 15,000 for `model(inputs)` (benchmarks/inference_speed.py,
            # batches of 10,000, stop 23).
            forward = getattr(model, "training_forward", model)  # TrainingView's, unwrapped
            chunks = [
                forward(norm.apply(batch[start : start + TORCH_CHUNK].to(device))).float().cpu()
                for start in range(0, len(batch), TORCH_CHUNK)
            ]
            return torch.cat(chunks).numpy() if chunks else np.zeros((0, 10), np.float32)


def onnx_session_options(threads: int | None = 1) -> Any:
    """onnxruntime session options for this network (measured in benchmarks/inference_speed.py).

    One intra-op thread by default: a single picture runs fastest that way, and a server that
    answers requests in a thread pool must not have each request spread over every core.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of ops: nothing to overlap
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if threads == 1:
        # No pool threads exist to spin; with more, spinning wastes cores a server needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
    return options


class OnnxModel:
    """An ONNX model written by `lenet export`, run by onnxruntime (no torch needed)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = 1) -> None:
        self.path = Path(path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                "The onnx backend needs onnxruntime, which is not installed: "
                "`pip install onnxruntime` (or `pip install 'lenet[export]'`)."
            ) from None
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such ONNX model file.")
        try:
            self.session = ort.InferenceSession(
                str(self.path), onnx_session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail...)
            raise WeightsError(
                f"{self.path} is not a readable ONNX model ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Re-export it with `lenet export WEIGHTS --format onnx "
                "--out FILE`, or re-copy it."
            ) from None
        self.metadata = parse_metadata(
            self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), self.path
        )
        self.card: dict[str, Any] = self.metadata["card"]
        norm = self.metadata["input"]["normalization"]
        self.mean, self.std = float(norm["mean"]), float(norm["std"])
        self.input_name = self.session.get_inputs()[0].name

    @property
    def name(self) -> str:
        """The registered model name the file was exported from."""
        return str(self.card["model"])

    @property
    def temperature(self) -> float:
        """The card's softmax temperature."""
        return temperature_of(self.card)

    @property
    def quantization(self) -> dict[str, Any] | None:
        """How the weights were quantized (None for a float model)."""
        return self.metadata.get("quantization")

    def source_weights(self) -> Path | None:
        """The PyTorch weights this file was exported from, where they can be found.

        Looked for beside the file (under the name its metadata records) and among the
        bundled weights of its model; only a file with the SHA-256 recorded at export counts.
        """
        from lenet.weights import bundled_weights, file_sha256

        source = self.metadata.get("source") or {}
        digest = source.get("sha256")
        if not digest:
            return None
        candidates = []
        if source.get("weights"):
            candidates.append(self.path.parent / Path(str(source["weights"])).name)
        bundled = bundled_weights().get(self.name)
        if bundled is not None:
            candidates.append(bundled)
        return next((c for c in candidates if c.is_file() and file_sha256(c) == digest), None)

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """Logits for already normalised (N, 1, 28, 28) float32 inputs, in cache-sized chunks."""
        chunks = [
            self.session.run(None, {self.input_name: inputs[start : start + ONNX_CHUNK]})[0]
            for start in range(0, len(inputs), ONNX_CHUNK)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, 10), np.float32)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, 10) float32 logits for (N, 28, 28) uint8 images."""
        return self.run(normalize(images, self.mean, self.std))


def parse_metadata(text: str | None, path: Path) -> dict[str, Any]:
    """Check the lenet metadata of an exported file; a WeightsError says what to do if wrong."""
    redo = "Export it again with `lenet export WEIGHTS --format onnx --out FILE`."
    if text is None:
        raise WeightsError(
            f"{path} is a model file but not one written by `lenet export`: it has no "
            f"{METADATA_KEY!r} metadata, so its input contract is unknown. {redo}"
        )
    try:
        meta = json.loads(text)
        card, norm = meta["card"], meta["input"]["normalization"]
        float(norm["mean"]), float(norm["std"]), str(card["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path} has damaged lenet metadata ({exc!r}). {redo}") from None
    if meta.get("format_version", 0) > METADATA_VERSION:
        raise WeightsError(
            f"{path} was written by a newer lenet (metadata version {meta['format_version']}); "
            "upgrade lenet to use it."
        )
    return meta


def bundled_onnx() -> dict[str, Path]:
    """The exported ONNX models shipped inside the package: name -> .onnx path."""
    folder = importlib.resources.files("lenet") / "pretrained"
    return {
        entry.name.removesuffix(".onnx"): Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".onnx")
    }


def resolve_onnx(name_or_path: str | os.PathLike[str] | None) -> Path:
    """An ONNX file from a path, a bundled model's name, or None for the best bundled model."""
    from lenet.weights import best_bundled

    if name_or_path is None:
        name_or_path = best_bundled()
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix == ".safetensors":
            raise WeightsError(
                f"{path} holds PyTorch weights; the onnx backend runs exported models. Export "
                f"it first: `lenet export {path} --format onnx --out {path.with_suffix('.onnx')}`"
                " (needs torch), then pass the .onnx file."
            )
        return path
    bundled = bundled_onnx()
    if str(name_or_path) in bundled:
        return bundled[str(name_or_path)]
    names = ", ".join(bundled) or "none"
    if Path(name_or_path).suffix.lower() == ".onnx":
        # A file's name, not a model's: the file is what is missing.
        raise WeightsError(f"{name_or_path}: no such file.")
    raise WeightsError(
        f"{name_or_path} is neither an ONNX file nor a bundled model with an ONNX export "
        f"(bundled: {names}). Export one with `lenet export WEIGHTS --format onnx --out FILE`."
    )


def torch_available() -> bool:
    """Whether PyTorch is installed (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def choose_backend(name_or_path: str | os.PathLike[str] | None, backend: str = "auto") -> str:
    """``torch`` or ``onnx``: auto picks onnx for a .onnx file or when torch is not installed."""
    if backend not in BACKENDS:
        raise ConfigError(f"Unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        if name_or_path is not None and Path(name_or_path).suffix == ".onnx":
            return "onnx"
        return "torch" if torch_available() else "onnx"
    if backend == "torch" and not torch_available():
        raise ConfigError(
            "The torch backend needs PyTorch, which is not installed here: use the onnx backend "
            "(--backend onnx) with a bundled model or a file from `lenet export`."
        )
    return backend


def command_line_backend(name_or_path: str | os.PathLike[str] | None, backend: str) -> str:
    """The backend `lenet predict` and `lenet serve` run: their ``auto`` prefers onnxruntime
    where it is installed and the model has an ONNX export (the bundled ones do): the same
    answers, the model part several times faster for a picture at a time. The Python API's
    ``auto`` stays torch, whose Recognizer hands out the PyTorch model."""
    if backend != "auto":
        return backend
    exported = (
        name_or_path is None
        or str(name_or_path) in bundled_onnx()
        or Path(name_or_path).suffix == ".onnx"
    )
    return "onnx" if exported and importlib.util.find_spec("onnxruntime") else "auto"


def load_backend(
    name_or_path: str | os.PathLike[str] | None = None,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    threads: int | None = 1,
) -> Backend:
    """The engine for a bundled name, a .safetensors or .onnx file, or None (best bundled).

    ``device`` applies to the torch backend, ``threads`` (onnxruntime intra-op threads) to onnx.
    """
    if choose_backend(name_or_path, backend) == "onnx":
        return OnnxModel(resolve_onnx(name_or_path), threads)
    if name_or_path is not None and Path(name_or_path).suffix == ".onnx":
        raise WeightsError(
            f"{name_or_path} is an ONNX model: load it with the onnx backend (--backend onnx)."
        )
    from lenet.weights import load_weights

    return TorchModel(load_weights(name_or_path, device))
