"""What the network sees and why it answers: first-layer filters, feature maps, saliency.

For one picture: the MNIST-style 28x28 that preprocessing makes of it, the filters of the first
convolution, the maps after every convolution and pooling layer, and a saliency map (how much
each input pixel moves the predicted digit's logit). Plain numbers here; ``lenet.plots`` draws
them, and the service sends ``Explanation.to_dict()`` as JSON. No matplotlib needed.
"""

from __future__ import annotations

import base64
import copy
import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from lenet.errors import ImageError, NoDigit
from lenet.lenet5 import SparseConv2d, Subsampling
from lenet.preprocess import DEFAULT_MAX_PIXELS, ImageSource, preprocess
from lenet.weights import LoadedWeights, load_weights

# Layers whose outputs are shown: what the tutorial explains (local receptive fields, then
# pooling). Activations and normalisation are left out: they change values, not the layout.
# LeNet-5's C3 (its sparse connection table) and S2/S4 (trainable subsampling) are its
# convolution and pooling stages: without them its explanation jumped from C1 to C5.
CONV_TYPES = (nn.Conv2d, SparseConv2d)
POOL_TYPES = (
    Subsampling,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.LPPool2d,
)
NO_DIGIT = "no digit found"


@dataclass(frozen=True)
class LayerMaps:
    """The output of one convolution or pooling layer for the explained image."""

    name: str  # the module's name in the model, e.g. "features.0"
    kind: str  # "convolution" or "pooling"
    description: str  # a short label, e.g. "Conv2d(1 -> 6, 5x5)" or "MaxPool2d(2)"
    maps: np.ndarray  # (channels, height, width) float32


@dataclass(frozen=True)
class Explanation:
    """Everything `lenet explain` shows about one image, as arrays."""

    model: str  # the registered model name
    digit: int  # the predicted digit (the most probable class)
    confidence: float  # its calibrated probability
    probabilities: list[float]  # calibrated (the card's temperature), one per class
    image: np.ndarray  # (28, 28) uint8: the preprocessed input, ink light on black
    box: tuple[int, int, int, int]  # where the digit was found: x0, y0, x1, y1 (x1, y1 excl.)
    filters: np.ndarray | None  # first convolution's weights (out, in, k, k); None: no conv
    filters_layer: str | None  # the name of that convolution
    layers: list[LayerMaps]  # in the order the forward pass runs them
    saliency: np.ndarray  # (28, 28) float32 in [0, 1]: |d logit[digit] / d pixel|, max 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; every picture is a base64 PNG, scaled as its ``scale`` says.

        Shape::

            {"model": str, "digit": int, "confidence": float, "probabilities": [10 floats],
             "box": [x0, y0, x1, y1],
             "input": {"png": b64, "width": 28, "height": 28},
             "saliency": {"png": b64, "width": 28, "height": 28, "values": 28 lists of 28},
             "filters": {"layer": str, "shape": [out, in, k, k], "scale": [lo, hi],
                         "png": [b64 per output channel (k x k, first input channel)]} | null,
             "layers": [{"name": str, "kind": "convolution"|"pooling", "description": str,
                         "shape": [C, H, W], "scale": [lo, hi], "png": [b64 per channel]}]}

        Maps and filters of one layer share one grey scale (``scale``: the values drawn black
        and white), so their brightness can be compared. PNGs are at their true size (e.g.
        24x24); enlarge them with ``image-rendering: pixelated``.
        """
        filters = None
        if self.filters is not None:
            lo, hi = _range(self.filters)
            filters = {
                "layer": self.filters_layer,
                "shape": list(self.filters.shape),
                "scale": [lo, hi],
                "png": [_png_b64(_to_grey(f[0], lo, hi)) for f in self.filters],
            }
        layers = []
        for layer in self.layers:
            lo, hi = _range(layer.maps)
            layers.append(
                {
                    "name": layer.name,
                    "kind": layer.kind,
                    "description": layer.description,
                    "shape": list(layer.maps.shape),
                    "scale": [lo, hi],
                    "png": [_png_b64(_to_grey(m, lo, hi)) for m in layer.maps],
                }
            )
        return {
            "model": self.model,
            "digit": self.digit,
            "confidence": round(self.confidence, 6),
            "probabilities": [round(p, 6) for p in self.probabilities],
            "box": list(self.box),
            "input": {"png": _png_b64(self.image), "width": 28, "height": 28},
            "saliency": {
                "png": _png_b64(_to_grey(self.saliency, 0.0, 1.0)),
                "width": 28,
                "height": 28,
                "values": np.round(self.saliency.astype(np.float64), 4).tolist(),
            },
            "filters": filters,
            "layers": layers,
        }


def _range(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    return round(lo, 6), round(hi, 6)


def _to_grey(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] onto 0..255; a constant map is drawn mid-grey rather than dividing by 0."""
    if hi - lo < 1e-12:
        return np.full(values.shape, 128, np.uint8)
    scaled = (values.astype(np.float64) - lo) / (hi - lo)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _png_b64(grey: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), mode="L").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _describe(module: nn.Module) -> str:
    """A short label: PyTorch's own repr of a pooling layer lists every default."""
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"{kind}({module.in_channels} -> {module.out_channels}, {kh}x{kw})"
    if isinstance(module, SparseConv2d):
        k, pairs = module.kernel_size, int(module.table.sum())
        return (
            f"{kind}({module.in_maps} -> {module.out_maps}, {k}x{k}, {pairs} of "
            f"{module.table.numel()} map pairs)"
        )
    if isinstance(module, Subsampling):
        return f"{kind}(2, trainable coefficient and bias per map)"
    size = getattr(module, "kernel_size", None) or getattr(module, "output_size", None)
    return f"{kind}({size})" if size is not None else kind


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, CONV_TYPES):
        return "convolution"
    if isinstance(module, POOL_TYPES):
        return "pooling"
    return None


def explain_digit(image: np.ndarray, weights: LoadedWeights) -> Explanation:
    """Explain a preprocessed (28, 28) uint8 digit (ink light on black) with loaded weights.

    The box is (0, 0, 28, 28): the image is its own picture.
    """
    if image.shape != (28, 28) or image.dtype != np.uint8:
        raise ImageError(
            f"explain_digit needs the (28, 28) uint8 image preprocessing makes, got "
            f"{image.shape} {image.dtype}: pass the picture to explain() instead."
        )
    return _explain(image, (0, 0, 28, 28), weights)


def explain(
    source: ImageSource,
    weights: str | os.PathLike[str] | LoadedWeights | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Explanation:
    """Explain the digit in a picture (path, bytes, file object, PIL image or numpy array).

    ``weights``: loaded weights (a server keeps them), a bundled model's name, a .safetensors
    file, or None for the most accurate bundled model. The picture goes through the shared
    preprocessing (``lenet.preprocess``), exactly as for `lenet predict`. Raises ImageError for
    a picture that cannot be decoded or holds no digit. Safe to call from several threads with
    the same loaded weights: the model itself is never hooked or switched to another mode.
    """
    loaded = weights if isinstance(weights, LoadedWeights) else load_weights(weights)
    digit = preprocess(source, max_pixels)
    if digit is None:
        raise NoDigit(
            f"{NO_DIGIT}: the picture holds no ink to explain. Give a picture of one digit "
            "(dark on light or light on dark)."
        )
    return _explain(digit.image, digit.box, loaded)


def _explain(
    image: np.ndarray, box: tuple[int, int, int, int], loaded: LoadedWeights
) -> Explanation:
    # A private copy (44k parameters: about 2 ms) to hook and to run in eval mode:
    # a service shares one LoadedWeights between threads, and hooks on the shared model would
    # also record, and disturb, other requests' forward passes.
    model = copy.deepcopy(loaded.model).eval()
    device = next(model.parameters()).device
    shown = [(name, m, _kind(m)) for name, m in model.named_modules() if _kind(m) is not None]
    captured: list[LayerMaps] = []

    def hook_for(name: str, kind: str) -> Any:
        def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            # A clone: an in-place activation after this layer would change the map under us.
            maps = output.detach()[0].float().cpu().clone().numpy()
            captured.append(LayerMaps(name, kind, _describe(module), maps))

        return hook

    # Hooks record in the order the forward pass runs, which is what a reader follows.
    handles = [m.register_forward_hook(hook_for(name, kind)) for name, m, kind in shown]
    try:
        x = loaded.normalization.apply(torch.from_numpy(image).view(1, 1, 28, 28)).to(device)
        x.requires_grad_(True)
        logits = model(x)
        digit = int(logits[0].argmax())
        # Saliency: the gradient of the predicted digit's logit with respect to each input
        # pixel (Simonyan et al., 2014), in absolute value: which pixels, changed a little,
        # would change the answer most.
        (gradient,) = torch.autograd.grad(logits[0, digit], x)
    finally:
        for handle in handles:
            handle.remove()
    probabilities = torch.softmax(logits.detach()[0].float().cpu() / loaded.temperature, 0)
    saliency = gradient[0, 0].abs().float().cpu().numpy()
    peak = float(saliency.max())
    saliency = saliency / peak if peak > 0 else saliency
    first_conv = next(((n, m) for n, m, kind in shown if kind == "convolution"), None)
    filters = first_conv[1].weight.detach().float().cpu().numpy() if first_conv else None
    return Explanation(
        model=loaded.name,
        digit=digit,
        confidence=float(probabilities[digit]),
        probabilities=probabilities.tolist(),
        image=image.copy(),
        box=tuple(int(v) for v in box),
        filters=filters,
        filters_layer=first_conv[0] if first_conv else None,
        layers=captured,
        saliency=saliency.astype(np.float32),
    )
