"""Reading digits in users' images: the Recognizer behind the CLI, the API and the service."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lenet.backends import Backend, OnnxModel, TorchModel, load_backend
from lenet.errors import ImageError
from lenet.preprocess import (
    DEFAULT_MAX_PIXELS,
    Digit,
    ImageSource,
    box_of,
    find_ink,
    load_picture,
    mnist_digit,
    preprocess,
)
from lenet.segment import digit_height, split_digits, split_in_two

# torch is imported only by the torch backend: a serving install with onnxruntime has none.
if TYPE_CHECKING:
    import torch

    from lenet.weights import LoadedWeights

# With calibrated probabilities, below this the best guess is more likely wrong than a
# careful reader would accept: the answer is marked unsure (digit None) for a human to check.
UNSURE_BELOW = 0.5
NO_DIGIT = "no digit found"
UNSURE = "unsure"


def _one_picture(images: object) -> bool:
    """Whether ``images``, given as a batch, is really one picture: a path, bytes, a PIL image,
    or an array of one picture, (H, W) grey or (H, W, 1-4) colour. An (N, H, W) array is a
    batch of grey pictures, unless its last side is 1 to 4 pixels: then it is a colour one."""
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 2 or (images.ndim == 3 and images.shape[2] <= 4)
    return hasattr(images, "getpixel")  # a PIL image (not iterable as pictures)


@dataclass(frozen=True)
class Prediction:
    """The answer for one digit."""

    digit: int | None  # None: no digit found, or unsure
    confidence: float  # calibrated probability of best_guess; 0 when there is no digit
    # Calibrated, one per digit 0-9; ten zeros when there is no digit, empty on an error.
    probabilities: list[float]
    best_guess: int | None = None
    reason: str | None = None  # None, "no digit found", "unsure" or "error" (predict_batch)
    # The (28, 28) uint8 input the model saw (left out of repr: 28 rows of numbers).
    image: np.ndarray | None = field(default=None, repr=False)
    box: tuple[int, int, int, int] | None = None  # where in the picture (x0, y0, x1, y1)
    error: str | None = None  # set when the picture could not be read (predict_batch)
    # Other digits beside this one that were left out (predict reads one; read() reads a line).
    others: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON answer (`lenet predict --json`, the service)."""
        if self.error is not None:
            return {"error": self.error}
        out: dict[str, Any] = {
            "digit": self.digit,
            "confidence": round(self.confidence, 6),
            "probabilities": [round(p, 6) for p in self.probabilities],
        }
        if self.reason is not None:
            out["reason"] = self.reason
            out["best_guess"] = self.best_guess
        if self.others:
            out["others"] = self.others
        return out


@dataclass(frozen=True)
class Reading:
    """The answer for a line of digits: the text (None when any digit is unsure or none found)."""

    text: str | None
    digits: list[Prediction]

    def to_dict(self) -> dict[str, Any]:
        """The JSON answer of `lenet predict --multi --json`."""
        return {
            "text": self.text,
            "digits": [
                {
                    "digit": d.digit,
                    "confidence": round(d.confidence, 6),
                    "box": list(d.box) if d.box else None,
                    **({"best_guess": d.best_guess} if d.digit is None else {}),
                }
                for d in self.digits
            ],
        }


class Recognizer:
    """A trained model with its card: images in, calibrated digits out.

    The model runs on PyTorch or on onnxruntime (``backend``); preprocessing, calibration and
    the answers are the same code for both.
    """

    def __init__(
        self, weights: LoadedWeights | Backend, unsure_below: float = UNSURE_BELOW
    ) -> None:
        # LoadedWeights (PyTorch) stays accepted as before; any Backend works too.
        self.backend: Backend = weights if hasattr(weights, "logits") else TorchModel(weights)
        self.weights = weights
        self.unsure_below = unsure_below
        self.max_pixels = DEFAULT_MAX_PIXELS

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        unsure_below: float = UNSURE_BELOW,
        backend: str = "auto",
        threads: int | None = 1,
    ) -> Recognizer:
        """A bundled model by name (`lenet`, `lenet-relu`), a .safetensors or .onnx file, or
        None for the most accurate bundled model.

        ``backend``: ``torch``, ``onnx`` (onnxruntime: a bundled name loads its bundled .onnx
        export), or ``auto`` (onnx for a .onnx file or when torch is not installed, else
        torch). ``device`` is for torch; ``threads`` is onnxruntime's intra-op thread count.
        """
        engine = load_backend(name_or_path, backend, device, threads)
        weights = engine.weights if isinstance(engine, TorchModel) else engine
        return cls(weights, unsure_below)

    @property
    def name(self) -> str:
        """The model's registered name."""
        return self.backend.name

    @property
    def card(self) -> dict[str, Any]:
        """The model card of the weights (or of the weights an ONNX file was exported from)."""
        return self.backend.card

    @property
    def backend_name(self) -> str:
        """``onnx`` or ``torch``."""
        return "onnx" if isinstance(self.backend, OnnxModel) else "torch"

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated probabilities (N, 10) for (28, 28) uint8 MNIST-style images."""
        if not len(images):
            return np.zeros((0, 10), np.float32)
        logits = self.backend.logits(np.stack(images)).astype(np.float64)
        # The card's temperature, then a softmax: the same for every backend.
        scaled = logits / self.backend.temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        exp = np.exp(scaled)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def _answer(self, digit: Digit | None, probs: np.ndarray | None) -> Prediction:
        if digit is None or probs is None:
            # Ten zeros keep the answer's shape; "reason" says there was nothing to read.
            return Prediction(None, 0.0, [0.0] * 10, reason=NO_DIGIT)
        best = int(probs.argmax())
        confidence = float(probs[best])
        sure = confidence >= self.unsure_below
        return Prediction(
            digit=best if sure else None,
            confidence=confidence,
            probabilities=[float(p) for p in probs],
            best_guess=best,
            reason=None if sure else UNSURE,
            image=digit.image,
            box=digit.box,
            others=digit.others,
        )

    def predict_digits(self, digits: Sequence[Digit | None]) -> list[Prediction]:
        """Predictions for already preprocessed digits (None: no digit), in one batch."""
        present = [d.image for d in digits if d is not None]
        probs = iter(self.probabilities(present))
        return [self._answer(d, next(probs) if d is not None else None) for d in digits]

    def predict(self, image: ImageSource) -> Prediction:
        """The digit in one picture (path, bytes, file object, PIL image or numpy array).

        Raises ImageError (with an HTTP-like ``status``) when the picture cannot be read.
        """
        return self.predict_digits([preprocess(image, self.max_pixels)])[0]

    def predict_batch(self, images: Sequence[ImageSource]) -> list[Prediction]:
        """One Prediction per picture, the model run once on all of them.

        A picture that cannot be read gets a Prediction with ``error`` set; the others are
        answered all the same.
        """
        if _one_picture(images):
            # A single picture would be taken apart (a path into characters, bytes into
            # numbers, an array into rows): refused rather than answered nonsensically.
            shape = f" of shape {images.shape}" if isinstance(images, np.ndarray) else ""
            raise TypeError(
                f"predict_batch takes a list of pictures, not one {type(images).__name__}"
                f"{shape}: use predict() for one picture, or pass [picture]."
            )
        digits: list[Digit | None] = []
        errors: dict[int, str] = {}
        for index, image in enumerate(images):
            try:
                digits.append(preprocess(image, self.max_pixels))
            except ImageError as exc:
                errors[index] = str(exc)
                digits.append(None)
        answers = self.predict_digits(digits)
        for index, message in errors.items():
            answers[index] = Prediction(None, 0.0, [], reason="error", error=message)
        return answers

    def read(self, image: ImageSource) -> Reading:
        """The digits in a line of handwriting, left to right."""
        found = find_ink(load_picture(image, self.max_pixels))
        if found is None:
            return Reading(None, [])
        parts = split_digits(found.mask)
        height = digit_height(parts) if parts else 0.0
        digits = []
        for part in parts:
            whole = Digit(mnist_digit(found.ink, part), box_of(part, found))
            halves = split_in_two(part, height)
            if halves is not None:
                pieces = [Digit(mnist_digit(found.ink, h), box_of(h, found)) for h in halves]
                best = self.probabilities([whole.image, *(p.image for p in pieces)]).max(axis=1)
                # One wide digit or two touching ones: the reading the model finds more
                # probable (two digits must each be likely for their product to win).
                if best[1] * best[2] > best[0]:
                    digits += pieces
                    continue
            digits.append(whole)
        predictions = self.predict_digits(digits)
        sure = predictions and all(p.digit is not None for p in predictions)
        text = "".join(str(p.digit) for p in predictions) if sure else None
        return Reading(text, predictions)
