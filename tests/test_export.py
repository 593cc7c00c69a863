"""Export to ONNX and TorchScript, the onnxruntime backend, and files that are not ours."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import userstyle
from onnx import TensorProto, helper
from safetensors.torch import load_file

from lenet.backends import OnnxModel, bundled_onnx
from lenet.errors import ExportError, WeightsError
from lenet.export import FORMATS, export, file_sha256, load_torchscript, read_metadata
from lenet.models import create_model, list_models
from lenet.recognize import Recognizer
from lenet.weights import bundled_weights, read_card, save_weights


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Weights for every registered model: the bundled file, else small random-init weights."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for name in list_models():
        if name in bundled_weights():
            out[name] = bundled_weights()[name]
            continue
        torch.manual_seed(0)
        card = {"model": name, "normalization": {"mean": 0.1307, "std": 0.3081}}
        out[name] = save_weights(folder / f"{name}.safetensors", create_model(name), card)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", list_models())
def test_every_model_exports_with_parity_and_its_card(model, fmt, sources, mnist, tmp_path):
    out = tmp_path / f"{model}.{'onnx' if fmt == 'onnx' else 'pt'}"
    result = export(sources[model], out, fmt)  # checked on the 10,000 test images
    parity = result.parity
    assert parity.images == 10_000 and parity.same_digit == 10_000
    assert parity.max_abs_diff <= 1e-4 and parity.ok
    assert parity.accuracy_exported == parity.accuracy_torch

    meta = read_metadata(out)
    card = read_card(sources[model])
    assert meta["card"] == card and meta["format"] == fmt
    assert meta["input"]["shape"] == ["batch", 1, 28, 28]
    assert meta["input"]["normalization"] == card["normalization"]
    assert "light" in meta["input"]["polarity"]
    assert meta["source"]["sha256"] == file_sha256(sources[model])

    # The batch dimension is dynamic: any batch size runs, and gives PyTorch's logits.
    reference = create_model(model)
    reference.load_state_dict(load_file(str(sources[model])))
    reference.eval()
    for batch in (1, 3, 301):
        inputs = torch.randn(batch, 1, 28, 28)
        if fmt == "onnx":
            got = OnnxModel(out).run(inputs.numpy())
        else:
            with torch.inference_mode():
                got = load_torchscript(out)(inputs).numpy()
        with torch.inference_mode():
            np.testing.assert_allclose(got, reference(inputs).numpy(), atol=1e-4)


def test_bundled_onnx_exports_are_the_bundled_weights():
    assert set(bundled_onnx()) == set(bundled_weights())
    for name, path in bundled_onnx().items():
        meta = OnnxModel(path).metadata
        assert meta["source"]["sha256"] == file_sha256(bundled_weights()[name]), (
            f"{path} is stale: run `lenet export {name} --format onnx --out {path}`"
        )
        assert meta["card"] == read_card(bundled_weights()[name])


@pytest.fixture(scope="module")
def readers():
    return Recognizer.load("lenet-relu", backend="torch"), Recognizer.load(
        "lenet-relu", backend="onnx"
    )


def test_the_commands_run_bundled_models_on_onnxruntime_and_the_api_on_torch(tmp_path):
    from lenet.backends import command_line_backend

    # `lenet predict` and `lenet serve`: onnxruntime (installed here) for what has an export.
    for exported in (None, "lenet", "lenet-relu", str(tmp_path / "model.onnx")):
        assert command_line_backend(exported, "auto") == "onnx"
    # A .safetensors file of one's own has no export; an explicit choice is kept.
    assert command_line_backend(str(tmp_path / "mine.safetensors"), "auto") == "auto"
    assert command_line_backend("lenet", "torch") == "torch"
    # The Python API's auto keeps the PyTorch model at hand.
    assert Recognizer.load().backend_name == "torch"


def test_onnx_backend_answers_user_pictures_like_torch(readers, mnist):
    torch_reader, onnx_reader = readers
    assert onnx_reader.backend_name == "onnx" and torch_reader.backend_name == "torch"
    assert onnx_reader.name == torch_reader.name and onnx_reader.card == torch_reader.card
    images = mnist.test.images[:, 0].numpy()
    rng = np.random.default_rng(99)
    pictures = [
        userstyle.STYLES[style](images[i], rng)
        for style in sorted(userstyle.STYLES)
        for i in rng.choice(len(images), 15, replace=False)
    ]
    ours, theirs = onnx_reader.predict_batch(pictures), torch_reader.predict_batch(pictures)
    assert [a.digit for a in ours] == [a.digit for a in theirs]
    assert [a.best_guess for a in ours] == [a.best_guess for a in theirs]
    # Calibrated probabilities (the card's temperature applied the same way) agree closely.
    np.testing.assert_allclose(
        [a.probabilities for a in ours], [a.probabilities for a in theirs], atol=1e-5
    )
    chosen = rng.choice(len(images), 4)
    line = userstyle.number_line([images[i] for i in chosen], rng)
    assert onnx_reader.read(line).to_dict() == torch_reader.read(line).to_dict()
    # The temperature really is applied: the probabilities are softmax(logits / T).
    digits = list(images[:20])
    logits = onnx_reader.backend.logits(np.stack(digits)).astype(np.float64)
    scaled = np.exp(logits / onnx_reader.card["temperature"])
    expected = scaled / scaled.sum(1, keepdims=True)
    np.testing.assert_allclose(onnx_reader.probabilities(digits), expected, atol=1e-6)
    assert onnx_reader.card["temperature"] != 1.0


def test_int8_keeps_accuracy_and_is_kept_only_if_faster(sources, mnist, tmp_path):
    out = tmp_path / "int8.onnx"
    try:
        result = export(sources["lenet-relu"], out, int8=True)
    except ExportError as exc:  # measured slower here (no VNNI): refused, and says why
        assert "keeps its accuracy" in str(exc) and "not faster" in str(exc)
        assert not out.exists()
        return
    assert result.int8_speed.int8_faster and result.parity.ok
    assert read_metadata(out)["quantization"]["format"] == "QDQ"


def foreign_onnx(path):
    """A valid ONNX model that `lenet export` did not write (no lenet metadata)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def lenet_cli(*args):
    return subprocess.run([sys.executable, "-m", "lenet", *args], capture_output=True, text=True)


def test_damaged_or_foreign_model_files_give_clear_errors(tmp_path):
    bundled = bundled_onnx()["lenet-relu"].read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(bundled[: len(bundled) // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\n" * 50)
    foreign = foreign_onnx(tmp_path / "foreign.onnx")
    for path in (truncated, garbage):
        with pytest.raises(WeightsError, match="not a readable ONNX model.*lenet export"):
            Recognizer.load(path)
    with pytest.raises(WeightsError, match="not one written by `lenet export`"):
        Recognizer.load(foreign, backend="onnx")
    broken_ts = tmp_path / "broken.pt"
    broken_ts.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(WeightsError, match="not a readable TorchScript"):
        read_metadata(broken_ts)
    with pytest.raises(WeightsError, match="Export it first"):
        Recognizer.load(bundled_weights()["lenet"], backend="onnx")
    with pytest.raises(WeightsError, match="onnx backend"):
        Recognizer.load(foreign, backend="torch")
    done = lenet_cli("predict", str(tmp_path), "--weights", str(foreign))
    assert done.returncode == 2 and "not one written by `lenet export`" in done.stderr
    assert "Traceback" not in done.stderr


def test_export_cli(tmp_path):
    out = tmp_path / "m.pt"
    done = lenet_cli("export", "lenet", "--out", str(out), "--no-check", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["format"] == "torchscript" and summary["parity"] is None
    assert read_metadata(out)["card"]["model"] == "lenet"
    done = lenet_cli("export", "lenet", "--out", str(tmp_path / "m.bin"))
    assert done.returncode == 2 and "--format onnx|torchscript" in done.stderr
    done = lenet_cli("export", "nope", "--out", str(tmp_path / "m.onnx"))
    assert done.returncode == 2 and "bundled: lenet, lenet-relu" in done.stderr
    # A folder, or a file name that says another format than --format: refused at once.
    done = lenet_cli("export", "lenet", "--out", str(tmp_path), "--no-check")
    assert done.returncode == 2 and "is a folder" in done.stderr
    done = lenet_cli(
        "export", "lenet", "--format", "torchscript", "--out", str(tmp_path / "m.onnx")
    )
    assert done.returncode == 2 and "named as onnx but --format is torchscript" in done.stderr
    assert not (tmp_path / "m.onnx").exists()
