"""Measuring a model on a labelled split: accuracy, loss, per-class scores, confusion matrix."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from lenet.data.datasets import TRAIN_SPLIT_SIZE, VAL_SIZE
from lenet.errors import ConfigError
from lenet.models import Normalization, TrainingView


@dataclass
class EvalResult:
    """The numbers people ask for, computed in one pass over a split."""

    count: int
    accuracy: float
    loss: float
    # confusion[i, j]: images of true class i predicted as class j.
    confusion: torch.Tensor
    seconds: float = 0.0  # wall time of the model on the split (not loading)
    # What was evaluated, when known (``evaluate`` fills these in from the model card).
    model: str = ""
    dataset: str = ""
    split: str = ""
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))
    # The model saw these images in training (the train split, or val after --no-validation):
    # the figures then say how well it fits them, not how well it reads unseen digits. How
    # many of them (the first ones): all, or fewer after --train-limit.
    trained_on: bool = False
    trained_on_images: int = 0

    @property
    def precision(self) -> list[float]:
        predicted = self.confusion.sum(0).clamp(min=1)
        return (self.confusion.diag() / predicted).tolist()

    @property
    def recall(self) -> list[float]:
        actual = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag() / actual).tolist()

    @property
    def f1(self) -> list[float]:
        out = []
        for p, r in zip(self.precision, self.recall):
            out.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON values (what `lenet evaluate --json` prints)."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "count": self.count,
            "accuracy": self.accuracy,
            "error": 1.0 - self.accuracy,
            "loss": self.loss,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "confusion": self.confusion.tolist(),
            "seconds": round(self.seconds, 4),
            "trained_on": self.trained_on,
            "trained_on_images": self.trained_on_images,
        }


def dataset_of(card: dict[str, Any], name: str, asked: str | None = None) -> str:
    """The dataset to evaluate a model on: the one its card names, which ``asked`` (a user's
    --dataset) may only repeat. A model's ten outputs are the classes it was trained on:
    scored against another dataset's labels, its figures would mean nothing."""
    trained = card.get("dataset", "mnist")
    if asked is not None and asked != trained:
        raise ConfigError(
            f"{name} was trained on {trained}, so it cannot be evaluated on {asked}: its "
            f"outputs are {trained}'s classes. Leave out --dataset, or evaluate a model trained "
            f"with `lenet train --dataset {asked}`."
        )
    return trained


def trained_on(card: dict[str, Any], split: str) -> bool:
    """Whether the model whose card this is was trained on any of the images of ``split``."""
    return images_trained_on(card, split, VAL_SIZE if split == "val" else TRAIN_SPLIT_SIZE) > 0


def images_trained_on(card: dict[str, Any], split: str, count: int) -> int:
    """How many of the ``count`` images of ``split`` the model whose card this is was trained
    on: the first ones. --train-limit N takes the first N of the training split, after it
    the validation split when there is none (--no-validation)."""
    config = card.get("config") or {}
    limit = config.get("train_limit")
    if split == "train":
        return count if limit is None else min(limit, count)
    if split == "val" and config.get("validation") is False:
        return count if limit is None else min(max(limit - TRAIN_SPLIT_SIZE, 0), count)
    return 0


def described(
    result: EvalResult, name: str, card: dict[str, Any], dataset: str, split: str
) -> EvalResult:
    """``result`` with what was evaluated filled in from the model's name and card."""
    seen = images_trained_on(card, split, result.count)
    return replace(
        result,
        model=name,
        dataset=dataset,
        split=split,
        classes=tuple(card.get("classes") or result.classes),
        trained_on=seen > 0,
        trained_on_images=seen,
    )


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    normalization: Normalization,
    batch_size: int = 1000,  # measured fastest on 2 cores: larger batches leave the cache
    compiled: bool = True,
) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 ``images`` (N, 1, 28, 28), in eval mode.

    Runs on the model's device; the model's train/eval mode is restored after. ``compiled``:
    through the model's cheaper order (``TrainingView``: on a CPU, lenet's compiled stages where
    they cover the model), the same logits to float32 rounding as ``model.forward``, which
    False runs (an export's parity check compares with exactly what was exported). For the
    10,000 MNIST test images and the tutorial's lenet: 0.11 against 0.62 s on 2 cores.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    forward = TrainingView(model) if compiled else model
    try:
        # No autograd graph: for a model in training it would keep every chunk's activations.
        with torch.no_grad():
            chunks = [
                forward(normalization.apply(images[start : start + batch_size].to(device)))
                .float()
                .cpu()
                for start in range(0, len(images), batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, 10)


def evaluate_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalization: Normalization,
    batch_size: int = 1000,
) -> EvalResult:
    """Evaluate ``model`` on uint8 ``images`` (N, 1, 28, 28) and int ``labels`` (N,)."""
    started = time.perf_counter()
    logits = predict_logits(model, images, normalization, batch_size)
    labels = labels.cpu()
    classes = logits.shape[1]
    pairs = labels * classes + logits.argmax(1)
    confusion = torch.bincount(pairs, minlength=classes**2).view(classes, classes)
    count = int(labels.shape[0])
    correct = int(confusion.diag().sum())
    loss = F.cross_entropy(logits, labels, reduction="sum").item() / max(count, 1)
    accuracy = correct / max(count, 1)
    return EvalResult(count, accuracy, loss, confusion, time.perf_counter() - started)


def evaluate(
    weights: str | os.PathLike[str],
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
) -> EvalResult:
    """Evaluate a weights file (with its model card) on a split of a dataset.

    ``dataset`` defaults to the one named on the card; the input normalisation is the card's.
    """
    from lenet.data import load_dataset
    from lenet.device import resolve_device
    from lenet.weights import load_weights

    loaded = load_weights(weights, resolve_device(device))
    dataset = dataset_of(loaded.card, loaded.name, dataset)
    part = load_dataset(dataset, data_dir).split(split)
    result = evaluate_model(loaded.model, part.images, part.labels, loaded.normalization)
    return described(result, loaded.name, loaded.card, dataset, split)
