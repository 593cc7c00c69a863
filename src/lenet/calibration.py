"""Confidence that means what it says: temperature scaling and the expected calibration error.

A network trained with cross-entropy is usually over-confident. Dividing its logits by one
temperature T, fitted on held-out data (the validation split, never the test set), fixes most
of that without changing any prediction (Guo et al., 2017).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
