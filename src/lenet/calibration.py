"""Confidence that means what it says: temperature scaling and the expected calibration error.

A network trained with cross-entropy is usually over-confident. Dividing its logits by one
temperature T, fitted on held-out data (the validation split, never the test set), fixes most
of that without changing any prediction (Guo et al., 2017).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lenet.data import Dataset
    from lenet.models import Normalization


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the negative log-likelihood of ``softmax(logits / T)``."""
    logits, labels = logits.detach().double(), labels.detach()
    # Optimise log T so that T stays positive; the problem is convex in 1/T and tiny.
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def expected_calibration_error(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins
    and weighted by how many predictions fall in each."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = confidence[inside].double().mean() - correct[inside].mean()
            total += float(inside.double().mean() * gap.abs())
    return total


# What `calibrate` writes on a model card.
CARD_FIELDS = ("temperature", "val_ece_before_calibration", "val_ece_after_calibration")


def calibrate(model: torch.nn.Module, data: Dataset, norm: Normalization) -> dict[str, float]:
    """Fit the softmax temperature on the validation split; report ECE before and after."""
    from lenet.evaluation import predict_logits

    logits = predict_logits(model, data.val.images, norm)
    labels = data.val.labels
    temperature = fit_temperature(logits, labels)
    before = expected_calibration_error(torch.softmax(logits, 1), labels)
    after = expected_calibration_error(torch.softmax(logits / temperature, 1), labels)
    return dict(zip(CARD_FIELDS, (round(temperature, 5), round(before, 5), round(after, 5))))


def uncalibrated() -> dict[str, None]:
    """The card's calibration fields for a model with nothing held out to fit them on: the
    probabilities stay the softmax's own (temperature 1)."""
    return dict.fromkeys(CARD_FIELDS)
