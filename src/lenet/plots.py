"""The figures: learning curves, confusion matrix, accuracy per class, worst errors,
reliability diagram, what the network sees (`lenet explain`), shift tolerance.

Each function takes plain numbers (numpy arrays, lists) and writes one PNG of a fixed pixel
size. Figures are built on ``matplotlib.figure.Figure`` and rendered by Agg, never through
pyplot: no window, no display and no backend setting (``MPLBACKEND``) is ever involved.
matplotlib is optional (``pip install 'lenet[plots]'``) and imported only when a figure is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lenet.errors import LenetError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lenet.explain import Explanation

DPI = 100  # with the sizes below (inches), every figure's pixel size is fixed and known
# Figure sizes in inches (width, height); the explanation's height grows with its layers.
SIZES = {
    "learning_curves": (11.0, 4.2),
    "confusion_matrix": (7.5, 6.5),
    "per_class_accuracy": (8.0, 4.0),
    "worst_errors": (10.4, 6.4),
    "reliability": (11.0, 4.5),
    "shift_tolerance": (8.0, 5.0),
}
GALLERY_COLUMNS, GALLERY_ROWS = 8, 4
EXPLAIN_WIDTH, EXPLAIN_TOP, EXPLAIN_ROW = 16.0, 2.8, 1.5  # inches
EXPLAIN_CHANNELS = 16  # maps shown per layer; LeNet's widest layer has 16


def _figure(
    name: str, size: tuple[float, float] | None = None, layout: str | None = None
) -> Figure:
    """A new figure of a known size; a clear error when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LenetError(
            "Figures need matplotlib, which is not installed. Install it with "
            "pip install 'lenet[plots]' (or pip install matplotlib) and run the command again."
        ) from None
    return Figure(figsize=size or SIZES[name], dpi=DPI)


def require_matplotlib() -> None:
    """Raise the install hint now, before a long job whose figures would otherwise fail."""
    _figure("learning_curves")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": it would change the pixel size from one figure to the next.
    fig.savefig(path, format="png", dpi=DPI)
    return path


def learning_curves(
    history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Loss and accuracy per epoch, training and validation, from ``metrics.jsonl`` lines."""
    if not history:
        raise LenetError("No epochs to draw: the run's metrics.jsonl is empty.")
    fig = _figure("learning_curves")
    epochs = [int(h["epoch"]) for h in history]
    axes = fig.subplots(1, 2)
    panels = (("loss", "loss (cross-entropy)", axes[0]), ("accuracy", "accuracy", axes[1]))
    for key, label, ax in panels:
        for split, style in (("train", "o-"), ("val", "s--")):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is None for v in values):
                continue
            name = "training (running mean over the epoch)" if split == "train" else "validation"
            ax.plot(epochs, values, style, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.split(" ")[0].capitalize() + " per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
        if len(epochs) == 1:
            ax.set_xlim(0.5, 1.5)
    fig.suptitle(title or "Learning curves")
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(
    confusion: np.ndarray | Sequence[Sequence[int]],
    path: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Heat map of the counts (rows: true class, columns: predicted), every count written.

    The colour scale is logarithmic: with 99% accuracy the diagonal holds about 1,000 images
    per class and the mistakes a handful, which a linear scale would all show as blank.
    """
    from matplotlib.colors import LogNorm

    counts = np.asarray(confusion, dtype=np.int64)
    n = counts.shape[0]
    classes = list(classes or [str(i) for i in range(n)])
    fig = _figure("confusion_matrix")
    ax = fig.subplots()
    shown = np.ma.masked_equal(counts, 0)
    cmap = _colormap("Blues").with_extremes(bad="white")  # zero: nothing to colour
    image = ax.imshow(shown, cmap=cmap, norm=LogNorm(vmin=1, vmax=max(int(counts.max()), 2)))
    threshold = math.sqrt(max(int(counts.max()), 1))  # the middle of the log scale
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                colour = "white" if counts[i, j] > threshold else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(n), classes)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"Confusion matrix ({int(counts.sum()):,} images)")
    fig.colorbar(image, ax=ax, label="images (log scale)")
    fig.tight_layout()
    return _save(fig, path)


def per_class_accuracy(
    confusion: np.ndarray | Sequence[Sequence[int]],
    path: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Bar chart of the accuracy (recall) of each true class, each value written on its bar."""
    counts = np.asarray(confusion, dtype=np.int64)
    totals = counts.sum(1)
    accuracy = np.divide(counts.diagonal(), np.maximum(totals, 1))
    n = counts.shape[0]
    classes = list(classes or [str(i) for i in range(n)])
    fig = _figure("per_class_accuracy")
    ax = fig.subplots()
    bars = ax.bar(range(n), accuracy, color="tab:blue")
    overall = counts.diagonal().sum() / max(counts.sum(), 1)
    ax.axhline(overall, color="tab:red", linestyle="--", label=f"all classes: {overall:.2%}")
    for bar, value in zip(bars, accuracy):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.1%}", ha="center",
                va="bottom", fontsize=8)  # fmt: skip
    # Zoomed in: at 99% every bar would look full on a 0-100% axis.
    low = max(0.0, math.floor((float(accuracy.min()) - 0.01) * 50) / 50)
    ax.set_ylim(low, 1.0 + (1.0 - low) * 0.08)
    ax.set_xticks(range(n), classes)
    ax.set_xlabel("true class")
    ax.set_ylabel("accuracy (recall)")
    ax.set_title(title or "Accuracy per class")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def error_gallery(
    images: Sequence[np.ndarray],
    true: Sequence[int],
    predicted: Sequence[int],
    confidence: Sequence[float],
    path: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """The given mistakes as a grid of 28x28 images (first 32), each captioned true/predicted."""
    classes = list(classes or [str(i) for i in range(10)])
    fig = _figure("worst_errors")
    axes = fig.subplots(GALLERY_ROWS, GALLERY_COLUMNS).ravel()
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k >= len(images):
            continue
        ax.imshow(np.asarray(images[k]).reshape(28, 28), cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"true {classes[true[k]]}, said {classes[predicted[k]]}\n({confidence[k]:.0%} sure)",
            fontsize=8,
        )
    if not images:
        fig.text(0.5, 0.5, "No mistakes on this split.", ha="center", va="center", fontsize=14)
    fig.suptitle(title or "The most confident mistakes (true class, answer, calibrated confidence)")
    # Fixed spacing: tight_layout over 32 axes takes over a second and changes nothing here.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.87, wspace=0.1, hspace=0.45)
    return _save(fig, path)


def _reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy, count (NaN when empty)."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    # Bins are (low, high], as in lenet.calibration.expected_calibration_error.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, confidence, bins) / counts
        accuracy = np.bincount(index, correct.astype(float), bins) / counts
    return mean_conf, accuracy, counts


def reliability_diagram(
    curves: Mapping[str, np.ndarray],
    labels: np.ndarray,
    path: str | os.PathLike[str],
    bins: int = 15,
    title: str = "",
) -> Path:
    """Accuracy against confidence per bin for each set of probabilities in ``curves``
    (e.g. before and after temperature scaling), and how many answers fall in each bin."""
    import torch

    from lenet.calibration import expected_calibration_error

    fig = _figure("reliability")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    left.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for (name, probabilities), marker in zip(curves.items(), "os^D"):
        probabilities = np.asarray(probabilities, dtype=np.float64)
        ece = expected_calibration_error(
            torch.from_numpy(probabilities), torch.from_numpy(np.asarray(labels)), bins
        )
        mean_conf, accuracy, counts = _reliability_bins(probabilities, labels, bins)
        filled = counts > 0
        left.plot(
            mean_conf[filled], accuracy[filled], marker + "-", label=f"{name} (ECE {ece:.4f})"
        )
        right.stairs(counts, edges, label=name)
    left.set_xlim(0, 1)
    left.set_ylim(0, 1.02)
    left.set_xlabel("confidence (probability of the answer)")
    left.set_ylabel("accuracy of the answers in the bin")
    left.set_title(f"Reliability ({bins} equal-width bins)")
    left.grid(alpha=0.3)
    left.legend(loc="upper left", fontsize=8)
    right.set_yscale("log")
    right.set_xlim(0, 1)
    right.set_xlabel("confidence")
    right.set_ylabel("answers in the bin (log scale)")
    right.set_title("How confident the answers are")
    right.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or "Calibration")
    fig.tight_layout()
    return _save(fig, path)


def explanation(explained: Explanation, path: str | os.PathLike[str]) -> Path:
    """`lenet explain`'s picture: input, saliency, answer; first-layer filters; feature maps.

    16 inches wide; 2.8 inches for the top row plus 1.5 per row of filters or maps. Axes are
    placed at fixed positions: an automatic layout of ~80 axes takes seconds.
    """
    rows = (1 if explained.filters is not None else 0) + len(explained.layers)
    height = EXPLAIN_TOP + EXPLAIN_ROW * rows
    fig = _figure("explanation", (EXPLAIN_WIDTH, height))

    def at(x: float, top: float, w: float, h: float) -> Any:
        """Axes at x inches from the left, ``top`` inches from the top, w x h inches."""
        return fig.add_axes((x / EXPLAIN_WIDTH, (height - top - h) / height,
                             w / EXPLAIN_WIDTH, h / height))  # fmt: skip

    fig.text(
        0.5, 1 - 0.12 / height, f"{explained.model}: the answer is {explained.digit} "
        f"({explained.confidence:.1%} calibrated confidence)", ha="center", va="top", fontsize=14,
    )  # fmt: skip
    _explanation_top(explained, fig, at)
    top = EXPLAIN_TOP
    if explained.filters is not None:
        filters = explained.filters[:, 0]  # the first input channel (the only one for grey)
        bound = float(np.abs(filters).max()) or 1.0
        _map_row(
            fig, at, top, filters, "RdBu_r", -bound, bound, "weight",
            f"First-layer filters ({explained.filters_layer}: "
            f"{explained.filters.shape[0]} of {explained.filters.shape[2]}x"
            f"{explained.filters.shape[3]}; red +, blue -)",
        )  # fmt: skip
        top += EXPLAIN_ROW
    for layer in explained.layers:
        c, h, w = layer.maps.shape
        shown = min(c, EXPLAIN_CHANNELS)
        what = f"{c} maps of {h}x{w}" + (f", first {shown} shown" if shown < c else "")
        _map_row(
            fig, at, top, layer.maps[:shown], "viridis", float(layer.maps.min()),
            float(layer.maps.max()), "value",
            f"After {layer.kind} {layer.name}: {layer.description} ({what})",
        )  # fmt: skip
        top += EXPLAIN_ROW
    return _save(fig, path)


def _explanation_top(explained: Explanation, fig: Figure, at: Any) -> None:
    side, top = 1.8, 0.75
    grey = dict(cmap="gray", vmin=0, vmax=255)
    ax = at(0.6, top, side, side)
    ax.imshow(explained.image, **grey)
    ax.set_title("input as the model sees it\n(28x28 after preprocessing)", fontsize=9)
    ax = at(3.3, top, side, side)
    heat = ax.imshow(explained.saliency, cmap="hot", vmin=0, vmax=1)
    ax.set_title(f"saliency: |d logit[{explained.digit}] / d pixel|", fontsize=9)
    fig.colorbar(heat, cax=at(3.3 + side + 0.1, top, 0.12, side), label="relative")
    ax2 = at(6.3, top, side, side)
    ax2.imshow(explained.image, **grey)
    ax2.imshow(explained.saliency, cmap="hot", vmin=0, vmax=1, alpha=0.6)
    ax2.set_title("saliency over the input", fontsize=9)
    for a in fig.axes:
        a.set_xticks([])
        a.set_yticks([])
    probabilities = np.asarray(explained.probabilities)
    classes = range(len(probabilities))
    colours = ["tab:orange" if k == explained.digit else "tab:blue" for k in classes]
    ax = at(9.4, top, 6.2, side)
    ax.bar(classes, probabilities, color=colours)
    ax.set_xticks(classes)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("digit", labelpad=1)
    ax.set_ylabel("probability (calibrated)")
    ax.set_title("the answer", fontsize=9)


def _map_row(
    fig: Figure, at: Any, top: float, maps: np.ndarray, cmap: str, low: float, high: float,
    unit: str, title: str,
) -> None:  # fmt: skip
    cell, gap, left = 0.8, 0.12, 0.3
    fig.text(left / EXPLAIN_WIDTH, 1 - (top + 0.08) / fig.get_figheight(), title,
             ha="left", va="top", fontsize=10)  # fmt: skip
    image = None
    for k in range(min(len(maps), EXPLAIN_CHANNELS)):
        ax = at(left + k * (cell + gap), top + 0.38, cell, cell)
        # One scale for the whole row, so the maps' strengths can be compared.
        image = ax.imshow(maps[k], cmap=cmap, vmin=low, vmax=high)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(str(k), fontsize=7, labelpad=1)
    if image is not None:
        x = left + min(len(maps), EXPLAIN_CHANNELS) * (cell + gap)
        fig.colorbar(image, cax=at(x, top + 0.38, 0.12, cell), label=unit)


def shift_tolerance(
    shifts: Sequence[int],
    accuracy: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """Accuracy against shift in pixels, one line per model: (mean, spread) per shift."""
    fig = _figure("shift_tolerance")
    ax = fig.subplots()
    for (name, (mean, spread)), marker in zip(accuracy.items(), "os^D"):
        ax.errorbar(list(shifts), mean, yerr=spread, fmt=marker + "-", capsize=3, label=name)
    ax.set_xlabel("shift (pixels, in each of the 4 directions)")
    ax.set_ylabel("MNIST test accuracy")
    ax.set_xticks(list(shifts))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title or "Accuracy on shifted test digits")
    fig.tight_layout()
    return _save(fig, path)


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]
