"""`lenet export`: weights to ONNX or TorchScript, with their card inside, checked for parity.

An exported file carries the model card and the input it expects (shape, normalisation,
polarity) in its metadata (ONNX ``metadata_props``, TorchScript ``_extra_files``) under the key
``lenet``, so whoever runs it, in any language, can feed it the right pixels. By default every
export is checked on the 10,000 MNIST test images against the PyTorch model it came from: the
same digit for every image and logits within 1e-4. A file that fails the check is not written.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenet import __version__
from lenet.atomic import write_bytes_atomic
from lenet.backends import (
    METADATA_KEY,
    METADATA_VERSION,
    ONNX_CHUNK,
    OnnxModel,
    normalize,
    parse_metadata,
)
from lenet.errors import ExportError, WeightsError
from lenet.inference_graph import GRAPH_NOTE, inference_graph
from lenet.weights import (
    EXPORTED_SUFFIXES,
    LoadedWeights,
    file_sha256,
    load_weights,
    resolve_weights,
)

FORMATS = ("onnx", "torchscript")
PARITY_TOLERANCE = 1e-4  # max |logit difference| allowed against PyTorch
INT8_MAX_ACCURACY_LOSS = 0.001  # 0.1 percentage points of test accuracy against float
# Training images that calibrate the int8 activation ranges: enough to cover the digits'
# variety; more changed the ranges by under 1% and only slowed the export.
CALIBRATION_IMAGES = 2000
CALIBRATION_SEED = 0
ONNX_OPSET = 20  # what torch's exporter emits natively; onnxruntime 1.18+ runs it
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class ParityReport:
    """How an exported model compares with PyTorch on the test images."""

    images: int
    same_digit: int  # images where both predict the same digit
    max_abs_diff: float  # the largest |logit difference| over all images and classes
    tolerance: float | None  # None: logits may differ (int8); only accuracy is bounded
    accuracy_torch: float
    accuracy_exported: float

    @property
    def ok(self) -> bool:
        """Whether the export gives the answers PyTorch gives (within tolerance)."""
        if self.tolerance is None:  # quantized: a bounded loss of accuracy, not equal logits
            return self.accuracy_torch - self.accuracy_exported <= INT8_MAX_ACCURACY_LOSS + 1e-12
        return self.same_digit == self.images and self.max_abs_diff <= self.tolerance


@dataclass(frozen=True)
class SpeedReport:
    """Images per second on the test images, float against int8, same session settings."""

    float_images_per_s: float
    int8_images_per_s: float

    @property
    def int8_faster(self) -> bool:
        """Whether quantization paid off on this machine."""
        return self.int8_images_per_s > self.float_images_per_s


@dataclass(frozen=True)
class ExportResult:
    """What `lenet export` wrote and how it checked out."""

    path: Path
    format: str
    model: str
    bytes: int
    seconds: float
    parity: ParityReport | None
    int8_speed: SpeedReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary of `lenet export --json`."""
        out = asdict(self)
        out["path"] = str(self.path)
        if self.parity is not None:
            out["parity"]["ok"] = self.parity.ok
        return out


def format_for(out: str | os.PathLike[str], fmt: str | None) -> str:
    """The format asked for, or the one the output file's suffix names."""
    suffix = Path(out).suffix.lower()
    if Path(out).is_dir():
        raise ExportError(f"{out} is a folder: give a file name, e.g. {Path(out) / 'model.onnx'}.")
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"Unknown format {fmt!r}: choose {' or '.join(FORMATS)}.")
        named = EXPORTED_SUFFIXES.get(suffix)
        if named is not None and named != fmt:
            # A TorchScript file named .onnx fails later, far from here, as "not ONNX".
            raise ExportError(
                f"{out} is named as {named} but --format is {fmt}: name the file "
                f"{'.onnx' if fmt == 'onnx' else '.pt'}, or leave --format out."
            )
        return fmt
    if suffix not in EXPORTED_SUFFIXES:
        raise ExportError(
            f"Cannot tell the format from {out!r}: pass --format onnx|torchscript "
            "(or name the file .onnx, .pt or .ts)."
        )
    return EXPORTED_SUFFIXES[suffix]


def build_metadata(
    loaded: LoadedWeights, fmt: str, quantization: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``lenet`` metadata an exported file carries: card, input contract, provenance."""
    norm = loaded.card["normalization"]
    return {
        "format_version": METADATA_VERSION,
        "card": loaded.card,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 1, 28, 28],
            "dtype": "float32",
            "layout": "NCHW",
            "normalization": {"mean": float(norm["mean"]), "std": float(norm["std"])},
            "formula": "x = (pixel / 255 - mean) / std",
            "polarity": "ink light (high values) on a black background, as in MNIST",
            "preprocessing": "a 20x20 box fitted into 28x28, centre of mass at the centre "
            "(lenet.preprocess); MNIST images already are in this form",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", 10],
            "meaning": "logits for digits 0-9; softmax(logits / temperature) gives the "
            "calibrated probabilities",
            "temperature": float(loaded.card.get("temperature") or 1.0),
        },
        "quantization": quantization,
        "source": {"weights": loaded.path.name, "sha256": file_sha256(loaded.path)},
        "format": fmt,
        "lenet_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' notices (deprecations, skipped torchvision ops): the parity
    check, not their chatter, says whether the export is right."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def onnx_bytes(loaded: LoadedWeights, metadata: dict[str, Any], rearrange: bool = True) -> bytes:
    """The model as ONNX with a dynamic batch dimension and the metadata attached.

    ``rearrange=False`` exports the layers as the model lists them (benchmarks compare)."""
    # torch's own default, the dynamo-based exporter: it traces with torch.export, so the
    # batch dimension is declared symbolically (Dim) and checked, not inferred from one trace
    # (and it folds BatchNorm, where inference_graph has not already). The TorchScript-based
    # exporter (dynamo=False) gives an equally correct graph (measured: same max difference)
    # but is deprecated.
    example = torch.zeros(2, 1, 28, 28)
    # The same function arranged for onnxruntime's CPU kernels (lenet.inference_graph).
    model = loaded.model.cpu().eval()
    network = inference_graph(model) if rearrange else model
    if network is not model:
        metadata = {**metadata, "graph": GRAPH_NOTE}
    with _quiet_exporter():
        program = torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=ONNX_OPSET,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    proto.doc_string = (
        f"lenet {loaded.name}: (batch, 1, 28, 28) float32 normalised digits -> (batch, 10) "
        f"logits. The input contract and model card are in metadata_props[{METADATA_KEY!r}]."
    )
    proto.producer_name, proto.producer_version = "lenet", __version__
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    return proto.SerializeToString()


def torchscript_bytes(loaded: LoadedWeights, metadata: dict[str, Any]) -> bytes:
    """The model as TorchScript (scripted, so no shape is fixed) with the metadata attached."""
    import io

    with _quiet_exporter():  # torch.jit is deprecated in favour of torch.export, still supported
        scripted = torch.jit.script(loaded.model.cpu().eval())
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={METADATA_KEY: json.dumps(metadata)})
    return buffer.getvalue()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``lenet`` metadata of an exported .onnx or TorchScript file (checked)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file.")
    head = path.read_bytes()[:4]
    if head.startswith(b"PK"):  # TorchScript archives are zip files
        extra = {METADATA_KEY: ""}
        try:
            with _quiet_exporter():
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except RuntimeError as exc:
            raise WeightsError(
                f"{path} is not a readable TorchScript file ({str(exc)[:200]}). Export it "
                "again with `lenet export WEIGHTS --format torchscript --out FILE`."
            ) from None
        text = extra[METADATA_KEY]
        return parse_metadata(text.decode() if isinstance(text, bytes) and text else None, path)
    return OnnxModel(path).metadata


def load_torchscript(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """A TorchScript file written by `lenet export` (its metadata checked first)."""
    read_metadata(path)
    with _quiet_exporter():
        return torch.jit.load(str(path), map_location="cpu").eval()


def labelled_test_images(
    loaded: LoadedWeights, data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The test split of the card's dataset: (N, 28, 28) uint8 images and (N,) labels."""
    from lenet.data import load_dataset

    data = load_dataset(loaded.card.get("dataset", "mnist"), data_dir)
    return data.test.images[:, 0].numpy(), data.test.labels.numpy()


def torch_logits(loaded: LoadedWeights, images: np.ndarray) -> np.ndarray:
    """The reference: PyTorch eager logits for (N, 28, 28) uint8 images."""
    from lenet.evaluation import predict_logits

    batch = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    # model.forward itself, as exported (not lenet's compiled stages).
    return predict_logits(loaded.model, batch, loaded.normalization, compiled=False).numpy()


def compare(
    reference: np.ndarray, exported: np.ndarray, labels: np.ndarray, tolerance: float | None
) -> ParityReport:
    """Parity of exported logits against the PyTorch reference on labelled images."""
    ref_digit, exp_digit = reference.argmax(1), exported.argmax(1)
    return ParityReport(
        images=len(labels),
        same_digit=int((ref_digit == exp_digit).sum()),
        max_abs_diff=float(np.abs(reference - exported).max()) if len(labels) else 0.0,
        tolerance=tolerance,
        accuracy_torch=float((ref_digit == labels).mean()),
        accuracy_exported=float((exp_digit == labels).mean()),
    )


def images_per_second(model: OnnxModel, inputs: np.ndarray, repeats: int = 3) -> float:
    """Throughput of an ONNX model on normalised inputs: the best of a few passes."""
    model.run(inputs[:ONNX_CHUNK])  # warm-up: the first run allocates
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        model.run(inputs)
        best = min(best, time.perf_counter() - started)
    return len(inputs) / best


def quantize_int8(
    float_model: bytes, calibration: np.ndarray, metadata: dict[str, Any]
) -> tuple[bytes, dict[str, Any]]:
    """Static int8 quantization of an ONNX model, activation ranges from ``calibration``.

    ``calibration`` holds normalised (N, 1, 28, 28) training images. Returns the model bytes
    (with the metadata, its ``quantization`` filled in) and that description.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter(np.array_split(calibration, max(1, len(calibration) // 500)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.chunks, None)
            return None if chunk is None else {INPUT_NAME: chunk}

    # QDQ with per-channel int8 weights and uint8 activations: onnxruntime fuses the pairs
    # into integer kernels on x86. Weights in 7 bits (reduce_range): without AVX-512 VNNI the
    # u8 x s8 products saturate in 16 bits; measured on lenet-relu, 8-bit weights lost 0.52
    # points of test accuracy, 7-bit ones 0.06 (signed activations: 0.52; percentile ranges:
    # 0.49). MinMax ranges: MNIST inputs are bounded and clean, the extremes are real values.
    settings = {
        "format": "QDQ",
        "weights": "int8 in 7 bits (reduce_range), per channel",
        "activations": "uint8, per tensor",
        "calibration": f"MinMax over {len(calibration)} training images (seed {CALIBRATION_SEED})",
        "tool": "onnxruntime.quantization.quantize_static",
    }
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(float_model)
        prepared = Path(tmp) / "prepared.onnx"
        with _quiet_exporter():
            # Shape inference and graph clean-up first, as onnxruntime's quantizer advises.
            quant_pre_process(str(source), str(prepared))
            quantize_static(
                str(prepared),
                str(target),
                Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        proto = onnx.load(str(target))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**metadata, "quantization": settings})
    return proto.SerializeToString(), settings


def calibration_inputs(
    loaded: LoadedWeights, data_dir: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """Normalised training images (never test images) for int8 calibration."""
    from lenet.data import load_dataset

    data = load_dataset(loaded.card.get("dataset", "mnist"), data_dir)
    rng = np.random.default_rng(CALIBRATION_SEED)
    chosen = np.sort(rng.choice(len(data.train), CALIBRATION_IMAGES, replace=False))
    norm = loaded.card["normalization"]
    images = data.train.images[torch.from_numpy(chosen), 0].numpy()
    return normalize(images, float(norm["mean"]), float(norm["std"]))


def export(
    weights: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    fmt: str | None = None,
    int8: bool = False,
    check: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
) -> ExportResult:
    """Export weights (a bundled name or a .safetensors file) to ``out``.

    With ``check`` (the default), the exported model is run on the test images of the card's
    dataset and compared with PyTorch; a file that fails is not written (ExportError). With
    ``int8`` (ONNX only) the model is statically quantized on training images; the check then
    bounds the accuracy loss (0.1 points) and requires it to be faster than the float model,
    else nothing is written (it is kept only where it pays off).
    """
    started = time.perf_counter()
    fmt = format_for(out, fmt)
    out = Path(out)
    if int8 and fmt != "onnx":
        raise ExportError(
            "--int8 is for ONNX exports (onnxruntime's quantization): use --format onnx."
        )
    needed = ("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else ()
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}, not installed here: "
            "`pip install 'lenet[export]'`."
        )
    resolve_weights(weights)  # a clear error for a wrong name before anything heavy starts
    loaded = load_weights(weights, "cpu")
    metadata = build_metadata(loaded, fmt)
    if fmt == "torchscript":
        data = torchscript_bytes(loaded, metadata)
    else:
        data = onnx_bytes(loaded, metadata)
    float_data, speed, parity = data, None, None
    if int8:
        data, _ = quantize_int8(float_data, calibration_inputs(loaded, data_dir), metadata)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        candidate = Path(tmp) / out.name
        candidate.write_bytes(data)
        if check:
            images, labels = labelled_test_images(loaded, data_dir)
            reference = torch_logits(loaded, images)
            if fmt == "torchscript":
                scripted = load_torchscript(candidate)
                batch = loaded.normalization.apply(torch.from_numpy(images).unsqueeze(1))
                with torch.inference_mode():
                    exported = torch.cat([scripted(c) for c in batch.split(1000)]).numpy()
            else:
                exported = OnnxModel(candidate).logits(images)
            parity = compare(reference, exported, labels, None if int8 else PARITY_TOLERANCE)
            if int8:
                (Path(tmp) / "float.onnx").write_bytes(float_data)
                norm = loaded.card["normalization"]
                inputs = normalize(images, float(norm["mean"]), float(norm["std"]))
                speed = SpeedReport(
                    images_per_second(OnnxModel(Path(tmp) / "float.onnx"), inputs),
                    images_per_second(OnnxModel(candidate), inputs),
                )
            if not parity.ok:
                raise ExportError(_parity_failure(parity, fmt))
            if speed is not None and not speed.int8_faster:
                raise ExportError(_int8_not_faster(parity, speed))
        else:
            read_metadata(candidate)  # at least the file must load and carry its card
        write_bytes_atomic(out, candidate.read_bytes())
    return ExportResult(
        out, fmt, loaded.name, len(data), time.perf_counter() - started, parity, speed
    )


def _parity_failure(parity: ParityReport, fmt: str) -> str:
    if parity.tolerance is None:
        return (
            f"The int8 model loses {(parity.accuracy_torch - parity.accuracy_exported):.2%} of "
            f"test accuracy ({parity.accuracy_exported:.2%} against {parity.accuracy_torch:.2%}"
            f"), more than the {INT8_MAX_ACCURACY_LOSS:.1%} allowed; nothing was written. Use "
            "the float export (without --int8)."
        )
    return (
        f"The {fmt} export does not match PyTorch: {parity.images - parity.same_digit} of "
        f"{parity.images} test images get another digit, max logit difference "
        f"{parity.max_abs_diff:.2e} (allowed {parity.tolerance:.0e}); nothing was written. "
        "Please report this with your torch and onnxruntime versions."
    )


def _int8_not_faster(parity: ParityReport, speed: SpeedReport) -> str:
    # Quantization is only worth its small loss of accuracy if it buys speed.
    return (
        f"The int8 model keeps its accuracy ({parity.accuracy_exported:.2%} against "
        f"{parity.accuracy_torch:.2%} in float) but is not faster on this machine: "
        f"{speed.int8_images_per_s:,.0f} images/s against {speed.float_images_per_s:,.0f} for "
        "the float model (one thread). Nothing was written: use the float export (without "
        "--int8), or add --no-check to write the int8 model unchecked."
    )
