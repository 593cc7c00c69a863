"""`lenet report` and `lenet evaluate --plots`: a model's evaluation as figures and one HTML page.

The page embeds every figure as a ``data:`` URI and carries its own styles, so it is one file
that opens anywhere, offline, and can be mailed or archived as it is.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenet.atomic import write_text_atomic
from lenet.data import Dataset
from lenet.errors import LenetError
from lenet.evaluation import (
    EvalResult,
    dataset_of,
    described,
    evaluate_model,
    predict_logits,
)
from lenet.training import CONFIG_NAME, CURVES_NAME, METRICS_NAME, REPORT_FOLDER

REPORT_NAME = "report.html"
GALLERY_SIZE = 32  # the most confident mistakes shown
FIGURES = {
    "confusion_matrix": "confusion_matrix.png",
    "per_class_accuracy": "per_class_accuracy.png",
    "worst_errors": "worst_errors.png",
    "reliability": "reliability.png",
}


@dataclass
class Evaluation:
    """One pass of a model over a split, with what the figures need beyond the counts."""

    result: EvalResult  # the same numbers `lenet evaluate` prints
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    logits: np.ndarray  # (N, classes) float32
    temperature: float  # the card's calibration temperature (1.0 when never fitted)
    card: dict[str, Any]
    weights: Path

    @property
    def calibrated(self) -> bool:
        """Whether a temperature was fitted (not for a model trained without validation)."""
        return self.card.get("temperature") is not None

    def probabilities(self, calibrated: bool = True) -> np.ndarray:
        """Softmax of the logits, divided by the card's temperature when ``calibrated``."""
        temperature = self.temperature if calibrated else 1.0
        return torch.softmax(torch.from_numpy(self.logits) / temperature, 1).numpy()


@dataclass(frozen=True)
class Mistake:
    """One wrongly classified image of the split."""

    index: int  # position in the split
    true: int
    predicted: int
    confidence: float  # calibrated probability of the wrong answer


def evaluate_split(
    weights: str | os.PathLike[str],
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    data: Dataset | None = None,
) -> Evaluation:
    """Evaluate weights (a file or a bundled model's name) on a split, keeping the logits.

    The counts come from ``lenet.evaluation.evaluate_model``, exactly as `lenet evaluate`
    computes them. ``data``: an already loaded dataset (tests pass a fixture).
    """
    from lenet.data import load_dataset
    from lenet.device import resolve_device
    from lenet.weights import load_weights

    loaded = load_weights(weights, resolve_device(device))
    dataset = dataset_of(loaded.card, loaded.name, dataset)
    if data is None:
        data = load_dataset(dataset, data_dir)
    part = data.split(split)
    result = evaluate_model(loaded.model, part.images, part.labels, loaded.normalization)
    result = described(result, loaded.name, loaded.card, dataset, split)
    logits = predict_logits(loaded.model, part.images, loaded.normalization)
    return Evaluation(
        result=result,
        images=part.images[:, 0].numpy(),
        labels=part.labels.numpy(),
        logits=logits.numpy(),
        temperature=loaded.temperature,
        card=loaded.card,
        weights=loaded.path,
    )


def worst_mistakes(evaluation: Evaluation, count: int = GALLERY_SIZE) -> list[Mistake]:
    """The ``count`` wrong answers given with the highest calibrated confidence."""
    probabilities = evaluation.probabilities()
    predicted = probabilities.argmax(1)
    confidence = probabilities.max(1)
    wrong = np.flatnonzero(predicted != evaluation.labels)
    # Stable sort on the negated confidence: ties keep the split's order.
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    return [
        Mistake(int(i), int(evaluation.labels[i]), int(predicted[i]), float(confidence[i]))
        for i in order
    ]


def evaluation_figures(evaluation: Evaluation, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the confusion matrix, accuracy per class, worst errors and reliability diagram."""
    from lenet import plots

    out = Path(out)
    r = evaluation.result
    what = f"{r.model} on {r.dataset} {r.split}"
    confusion = r.confusion.numpy()
    mistakes = worst_mistakes(evaluation)
    figures = {
        "confusion_matrix": plots.confusion_matrix(
            confusion, out / FIGURES["confusion_matrix"], r.classes,
            f"Confusion matrix: {what}\n{r.count:,} images, accuracy {r.accuracy:.2%}",
        ),
        "per_class_accuracy": plots.per_class_accuracy(
            confusion, out / FIGURES["per_class_accuracy"], r.classes,
            f"Accuracy per class: {what}",
        ),
        "worst_errors": plots.error_gallery(
            [evaluation.images[m.index] for m in mistakes],
            [m.true for m in mistakes],
            [m.predicted for m in mistakes],
            [m.confidence for m in mistakes],
            out / FIGURES["worst_errors"],
            r.classes,
            f"The {len(mistakes)} most confident mistakes of {r.count - int(confusion.trace())}"
            f" ({what}; true class, answer, calibrated confidence)",
        ),
        "reliability": plots.reliability_diagram(
            {
                "softmax (T = 1)": evaluation.probabilities(calibrated=False),
                # A model trained without a validation split has no temperature to show.
                **(
                    {f"calibrated (T = {evaluation.temperature:.3g})": evaluation.probabilities()}
                    if evaluation.calibrated
                    else {}
                ),
            },
            evaluation.labels,
            out / FIGURES["reliability"],
            title=f"Calibration: {what}",
        ),
    }  # fmt: skip
    return figures


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epochs of a run's ``metrics.jsonl``, one dict per line."""
    path = Path(path)
    history = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LenetError(
                f"{path} line {number} is not JSON ({exc.msg}): the file is damaged. "
                "Training rewrites it after every epoch; resume or re-train the run."
            ) from None
        wrong = _not_numbers(entry)
        if wrong:
            raise LenetError(
                f"{path} line {number} does not hold an epoch's numbers (wrong or missing: "
                f"{', '.join(wrong)}): the file is damaged. Training rewrites it after every "
                "epoch; resume or re-train the run."
            )
        history.append(entry)
    return history


# What each line of metrics.jsonl holds as numbers; the validation ones are null (or absent)
# without validation.
METRIC_NUMBERS = ("epoch", "train_loss", "train_accuracy")
OPTIONAL_METRIC_NUMBERS = ("val_loss", "val_accuracy")


def _not_numbers(entry: Any) -> list[str]:
    """The keys of a metrics line that the figures and tables need as numbers but are not."""
    if not isinstance(entry, dict):
        return list(METRIC_NUMBERS)
    numbers = (int, float)
    return [k for k in METRIC_NUMBERS if not isinstance(entry.get(k), numbers)] + [
        k for k in OPTIONAL_METRIC_NUMBERS if not isinstance(entry.get(k), (*numbers, type(None)))
    ]


@dataclass(frozen=True)
class ReportSource:
    """What `lenet report` was given, resolved: the weights, and the run when there is one."""

    weights: Path
    name: str  # for titles and the default folder: the bundled name or the file's stem
    run_dir: Path | None
    history: list[dict[str, Any]] | None  # None: no metrics.jsonl to draw curves from
    why_no_curves: str = ""


def resolve_source(source: str | os.PathLike[str]) -> ReportSource:
    """A run folder, a weights file (its folder's metrics.jsonl is used when present) or the
    name of a bundled model."""
    from lenet.weights import bundled_weights, resolve_weights

    path = Path(source)
    weights = resolve_weights(source)  # a run folder means the weights the run wrote
    run_dir = weights.parent
    if not path.is_dir():
        bundled = {p.resolve() for p in bundled_weights().values()}
        if weights.resolve() in bundled:
            return ReportSource(
                weights, str(source), None, None,
                f"{source} is a bundled model: its weights ship without the run's per-epoch "
                "metrics, so there are no learning curves. Its model card says how it was "
                "trained; `lenet report RUN_DIR` on a run of your own draws them.",
            )  # fmt: skip
    metrics = run_dir / METRICS_NAME
    if not metrics.is_file():
        return ReportSource(
            weights, run_dir.name if path.is_dir() else weights.stem, run_dir, None,
            f"{run_dir} holds no {METRICS_NAME}, so there are no learning curves "
            "(only a run folder written by `lenet train` has them).",
        )  # fmt: skip
    history = read_metrics(metrics)
    name = run_dir.name if path.is_dir() else weights.stem
    if not history:
        return ReportSource(weights, name, run_dir, None, f"{metrics} holds no epochs yet.")
    return ReportSource(weights, name, run_dir, history)


@dataclass
class Report:
    """What `lenet report` wrote."""

    html: Path
    figures: dict[str, Path]
    evaluation: Evaluation
    source: ReportSource
    mistakes: list[Mistake] = field(default_factory=list)


def default_out(source: ReportSource) -> Path:
    """``RUN_DIR/report`` for a run folder written by `lenet train` (its config.json says so,
    with or without its metrics.jsonl); ``report-<name>`` in the current folder otherwise: a
    model.safetensors downloaded elsewhere is no run of ours, and its folder is not ours to
    write into."""
    run_dir = source.run_dir
    if run_dir is not None and (source.history is not None or (run_dir / CONFIG_NAME).is_file()):
        return run_dir / REPORT_FOLDER
    return Path(f"report-{source.name}")


def build_report(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    data: Dataset | None = None,
) -> Report:
    """Evaluate, draw every figure into ``out`` and write ``out/report.html`` (self-contained)."""
    from lenet import plots

    plots.require_matplotlib()
    resolved = resolve_source(source)
    out_dir = Path(out) if out is not None else default_out(resolved)
    if out_dir.exists() and not out_dir.is_dir():
        raise LenetError(f"--out {out_dir} is a file, not a folder: choose another --out.")
    evaluation = evaluate_split(resolved.weights, dataset, split, data_dir, device, data)
    figures: dict[str, Path] = {}
    if resolved.history is not None:
        figures["learning_curves"] = plots.learning_curves(
            resolved.history, out_dir / CURVES_NAME,
            f"Learning curves: {evaluation.result.model}, {resolved.name}",
        )  # fmt: skip
    figures.update(evaluation_figures(evaluation, out_dir))
    mistakes = worst_mistakes(evaluation)
    page = render_html(evaluation, resolved, figures, mistakes)
    html_path = out_dir / REPORT_NAME
    write_text_atomic(html_path, page)
    return Report(html_path, figures, evaluation, resolved, mistakes)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
table.card td { text-align: left; font-family: monospace; white-space: pre-wrap; }
td.diag { background: #dbe8f6; font-weight: bold; }
p.note { background: #fff6d9; border-left: 4px solid #e0b000; padding: 0.6em 1em; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _card_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, indent=1)
    return "" if value is None else str(value)


def render_html(
    evaluation: Evaluation,
    source: ReportSource,
    figures: dict[str, Path],
    mistakes: list[Mistake],
) -> str:
    """The report page: every figure embedded, the numbers beside them as tables."""
    r = evaluation.result
    esc = html.escape
    n = len(r.classes)
    confusion = r.confusion.tolist()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>lenet report: {esc(source.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>lenet report: {esc(r.model)} ({esc(source.name)})</h1>",
        f"<p>Evaluated on the <b>{esc(r.dataset)} {esc(r.split)}</b> split: "
        f"<b>{r.count:,}</b> images, accuracy <b>{r.accuracy:.2%}</b> "
        f"(error {1 - r.accuracy:.2%}), mean loss {r.loss:.4f}. Weights: "
        f"<code>{esc(str(evaluation.weights))}</code>. Written "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}.</p>",
    ]
    if r.trained_on:
        seen = (
            f"These {r.count:,} images were trained on"
            if r.trained_on_images == r.count
            else f"The first {r.trained_on_images:,} of these {r.count:,} images were trained on"
        )
        parts.append(
            f'<p class="note" id="seen-images"><b>{seen}</b>: the figures say how well the '
            "model fits them, not how well it reads digits it has not seen (use the test split "
            "for that).</p>"
        )
    parts.append("<h2>Learning curves</h2>")
    if "learning_curves" in figures:
        parts.append(_img(figures["learning_curves"], "learning curves"))
        rows = "".join(
            f"<tr><td>{h['epoch']}</td><td>{h['train_loss']:.4f}</td>"
            f"<td>{h['train_accuracy']:.4f}</td><td>{_figure(h.get('val_loss'))}</td>"
            f"<td>{_figure(h.get('val_accuracy'))}</td></tr>"
            for h in source.history or []
        )
        parts.append(
            '<table id="epochs"><tr><th>epoch</th><th>train loss</th><th>train accuracy</th>'
            f"<th>val loss</th><th>val accuracy</th></tr>{rows}</table>"
        )
    else:
        parts.append(f'<p class="note" id="no-curves">No learning curves: '
                     f"{esc(source.why_no_curves)}</p>")  # fmt: skip
    parts += [
        "<h2>Confusion matrix</h2>",
        _img(figures["confusion_matrix"], "confusion matrix"),
        "<p>Rows: true class; columns: the model's answer.</p>",
        '<table id="confusion"><tr><th>true \\ predicted</th>',
        "".join(f"<th>{esc(c)}</th>" for c in r.classes) + "<th>total</th></tr>",
    ]
    for i in range(n):
        cells = "".join(
            f"<td{' class=diag' if i == j else ''}>{confusion[i][j]}</td>" for j in range(n)
        )
        parts.append(f"<tr><th>{esc(r.classes[i])}</th>{cells}<td>{sum(confusion[i])}</td></tr>")
    parts.append("</table>")
    parts += [
        "<h2>Accuracy per class</h2>",
        _img(figures["per_class_accuracy"], "accuracy per class"),
        '<table id="per-class"><tr><th>class</th><th>images</th><th>accuracy (recall)</th>'
        "<th>precision</th><th>F1</th></tr>",
    ]
    for i in range(n):
        parts.append(
            f"<tr><td>{esc(r.classes[i])}</td><td>{sum(confusion[i])}</td>"
            f"<td>{r.recall[i]:.4f}</td><td>{r.precision[i]:.4f}</td><td>{r.f1[i]:.4f}</td></tr>"
        )
    parts.append("</table>")
    parts += [
        "<h2>The worst errors</h2>",
        "<p>The wrong answers given with the highest (calibrated) confidence.</p>",
        _img(figures["worst_errors"], "worst errors"),
        '<table id="mistakes"><tr><th>image (index in the split)</th><th>true</th>'
        "<th>answer</th><th>confidence</th></tr>",
        "".join(
            f"<tr><td>{m.index}</td><td>{esc(r.classes[m.true])}</td>"
            f"<td>{esc(r.classes[m.predicted])}</td><td>{m.confidence:.4f}</td></tr>"
            for m in mistakes
        ),
        "</table>",
    ]
    ece = _ece_pair(evaluation)
    if not evaluation.calibrated:
        calibrated = "no temperature was fitted: the model was trained without a validation split"
    else:
        calibrated = (
            f"{ece[1]:.4f} with the temperature T = {evaluation.temperature:.4g} fitted on the "
            "validation split when training ended"
        )
    parts += [
        "<h2>Calibration</h2>",
        f"<p>Expected calibration error on this split (15 bins): {ece[0]:.4f} with the plain "
        f"softmax; {calibrated}. On the diagonal, a confidence of p is right a fraction p of "
        "the time.</p>",
        _img(figures["reliability"], "reliability diagram"),
        "<h2>Model card</h2>",
        '<table class="card" id="card"><tr><th>field</th><th>value</th></tr>',
        "".join(
            f"<tr><td>{esc(str(k))}</td><td>{esc(_card_value(v))}</td></tr>"
            for k, v in evaluation.card.items()
        ),
        "</table>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _figure(value: float | None) -> str:
    """A per-epoch figure for the table; a dash where there is none (no validation split)."""
    return "-" if value is None else f"{value:.4f}"


def _ece_pair(evaluation: Evaluation) -> tuple[float, float]:
    from lenet.calibration import expected_calibration_error

    labels = torch.from_numpy(evaluation.labels)
    return (
        expected_calibration_error(
            torch.from_numpy(evaluation.probabilities(calibrated=False)), labels
        ),
        expected_calibration_error(torch.from_numpy(evaluation.probabilities()), labels),
    )
