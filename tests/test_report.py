"""`lenet report`, `lenet evaluate --plots` and `lenet train --plots` on real MNIST: the files,
their sizes, the numbers in the report against `lenet evaluate --json`, and a page that needs
nothing outside itself."""

import base64
import io
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from lenet.cli import main
from lenet.errors import LenetError
from lenet.report import default_out, resolve_source
from lenet.weights import bundled_weights, read_card

# Pixel sizes: inches x 100 dpi, as the figures are declared in lenet.plots.
SIZES = {
    "confusion_matrix.png": (750, 650),
    "per_class_accuracy.png": (800, 400),
    "worst_errors.png": (1040, 640),
    "reliability.png": (1100, 450),
}
CURVES_SIZE = (1100, 420)


class Page(HTMLParser):
    """Every tag's attributes, and each table (by id) as rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.attributes, self.tables, self.notes = [], {}, []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attributes.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "p" and attrs.get("class") == "note":
            self.notes.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def read_page(path):
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def assert_self_contained(text, page):
    assert "http:" not in text and "https:" not in text
    assert "url(" not in text and "@import" not in text
    linked = [(tag, a) for tag, a in page.attributes if "src" in a or "href" in a]
    assert linked, "no embedded figure at all"
    for tag, attrs in linked:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith("data:"), (tag, attrs[key][:60])
    assert not [tag for tag, _ in page.attributes if tag in ("script", "link", "iframe")]


def embedded_sizes(page):
    sizes = []
    for tag, attrs in page.attributes:
        if tag == "img":
            head, data = attrs["src"].split(",", 1)
            assert head == "data:image/png;base64"
            sizes.append(Image.open(io.BytesIO(base64.b64decode(data))).size)
    return sizes


@pytest.fixture
def session_mnist(mnist, monkeypatch):
    """The commands read MNIST themselves; hand them the session's copy (no second parse)."""
    monkeypatch.setattr("lenet.data.load_dataset", lambda *args, **kwargs: mnist)
    return mnist


def test_report_of_bundled_weights_agrees_with_evaluate(session_mnist, tmp_path, capsys):
    figures = tmp_path / "figures"
    assert main(["evaluate", "lenet-relu", "--json", "--plots", str(figures)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for name, size in SIZES.items():
        assert Image.open(figures / name).size == size
    assert sorted(evaluated["figures"]) == sorted(n.removesuffix(".png") for n in SIZES)

    out = tmp_path / "report"
    assert main(["report", "lenet-relu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no learning curves" in printed and str(out / "report.html") in printed
    for name, size in SIZES.items():
        assert Image.open(out / name).size == size
    assert not (out / "learning_curves.png").exists()

    text, page = read_page(out / "report.html")
    assert_self_contained(text, page)
    assert sorted(embedded_sizes(page)) == sorted(SIZES.values())
    assert page.notes == ["no-curves"] and "bundled model" in text

    # The confusion matrix: the counts `lenet evaluate --json` gives, every test image once.
    rows = page.tables["confusion"][1:]
    confusion = [[int(cell) for cell in row[1:11]] for row in rows]
    assert confusion == evaluated["confusion"]
    assert sum(map(sum, confusion)) == evaluated["count"] == len(session_mnist.test) == 10_000
    per_class = torch.bincount(session_mnist.test.labels, minlength=10).tolist()
    assert [sum(row) for row in confusion] == per_class
    assert [int(row[11]) for row in rows] == per_class
    correct = sum(confusion[i][i] for i in range(10))
    assert (
        correct / 10_000
        == evaluated["accuracy"]
        == read_card(bundled_weights()["lenet-relu"])["test_accuracy"]
    )

    # The gallery's table: real mistakes, most confident first, as many as the matrix holds.
    mistakes = page.tables["mistakes"][1:]
    assert len(mistakes) == min(32, 10_000 - correct)
    confidences = [float(row[3]) for row in mistakes]
    assert confidences == sorted(confidences, reverse=True)
    for index, true, said, _ in mistakes:
        assert int(true) == int(session_mnist.test.labels[int(index)]) != int(said)

    card = dict((row[0], row[1]) for row in page.tables["card"][1:])
    assert card["model"] == "lenet-relu" and "command" in card


def test_train_plots_then_the_run_report_has_the_curves(small_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lenet.training.load_dataset", lambda *args, **kwargs: small_mnist)
    monkeypatch.setattr("lenet.data.load_dataset", lambda *args, **kwargs: small_mnist)
    run = tmp_path / "run"
    argv = ["train", "--model", "lenet-relu", "--epochs", "1", "--batch-size", "256"]
    assert main([*argv, "--out", str(run), "--plots", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["learning_curves"] == str(run / "learning_curves.png")
    assert Image.open(run / "learning_curves.png").size == CURVES_SIZE

    assert main(["report", str(run)]) == 0  # default: RUN_DIR/report
    out = run / "report"
    assert Image.open(out / "learning_curves.png").size == CURVES_SIZE
    text, page = read_page(out / "report.html")
    assert_self_contained(text, page)
    assert len(embedded_sizes(page)) == 5 and page.notes == []
    epoch = json.loads((run / "metrics.jsonl").read_text())
    (row,) = page.tables["epochs"][1:]
    assert int(row[0]) == 1 and float(row[4]) == pytest.approx(epoch["val_accuracy"], abs=1e-4)


def test_where_the_curves_come_from(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    weights = bundled_weights()["lenet"]
    shutil.copy(weights, run / "model.safetensors")
    shutil.copy(weights.with_suffix(".json"), run / "model.json")
    lines = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.9, "val_loss": 0.5,
              "val_accuracy": 0.95} for e in (1, 2)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    # A run folder, or the weights inside it: the run's metrics.
    assert resolve_source(run).history == lines
    assert resolve_source(run / "model.safetensors").history == lines
    # Weights alone, or bundled weights: no curves, and the reason says so.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "model.safetensors", alone / "w.safetensors")
    shutil.copy(run / "model.json", alone / "w.json")
    assert resolve_source(alone / "w.safetensors").history is None
    assert "metrics.jsonl" in resolve_source(alone / "w.safetensors").why_no_curves
    assert "bundled" in resolve_source("lenet").why_no_curves
    # Reports go into a run folder, whether or not it kept its metrics; weights found
    # elsewhere get theirs in the current folder, named for them.
    assert default_out(resolve_source(run)) == run / "report"
    assert default_out(resolve_source(alone / "w.safetensors")) == Path("report-w")
    (run / "metrics.jsonl").unlink()
    # Without config.json it is no run of ours (a model.safetensors downloaded elsewhere).
    assert default_out(resolve_source(run / "model.safetensors")) == Path("report-model")
    (run / "config.json").write_text("{}")
    assert default_out(resolve_source(run)) == run / "report"
    assert default_out(resolve_source(run / "model.safetensors")) == run / "report"
    assert default_out(resolve_source("lenet")) == Path("report-lenet")
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    # A line with a word where a number belongs (edited by hand, damaged): a clear error.
    (run / "metrics.jsonl").write_text(json.dumps({**lines[0], "train_loss": "NaN"}) + "\n")
    with pytest.raises(LenetError, match="line 1 does not hold an epoch's numbers.*train_loss"):
        resolve_source(run)
    # A run that has not finished: what to do.
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(Exception, match="lenet train --resume --out"):
        resolve_source(tmp_path / "unfinished")


def test_without_matplotlib_plots_fail_at_once_with_the_install_hint(tmp_path, monkeypatch, capsys):
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--plots"]) == 2
    assert "pip install 'lenet[plots]'" in capsys.readouterr().err
    assert not run.exists()  # refused before any training
    assert main(["report", "lenet", "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'lenet[plots]'" in capsys.readouterr().err


def test_a_run_without_validation_reports_what_it_trained_on(small_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr("lenet.training.load_dataset", lambda *args, **kwargs: small_mnist)
    monkeypatch.setattr("lenet.data.load_dataset", lambda *args, **kwargs: small_mnist)
    run = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--epochs", "1", "--no-validation", "--out", str(run)]
    assert main(argv) == 0
    assert main(["report", str(run), "--split", "val"]) == 0
    text, page = read_page(run / "report" / "report.html")
    # The validation images were trained on, so the page says so, shows no validation
    # figures per epoch, and fits no temperature.
    assert page.notes == ["seen-images"]
    (row,) = page.tables["epochs"][1:]
    assert row[3:5] == ["-", "-"]
    assert "no temperature was fitted" in text
