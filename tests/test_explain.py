"""`lenet explain`: the maps against an independent forward pass, the saliency against finite
differences, every registered model, the JSON the service sends, a figure drawn with no display."""

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lenet.errors import ImageError
from lenet.explain import explain, explain_digit
from lenet.lenet5 import SparseConv2d, Subsampling
from lenet.models import MODELS, create_model
from lenet.preprocess import preprocess
from lenet.weights import load_weights, save_weights


def paper_png(digit):
    """An MNIST digit as a user's picture: dark ink on white, three times larger, off centre."""
    page = np.full((120, 140), 255, np.uint8)
    page[10:94, 40:124] = 255 - np.kron(digit, np.ones((3, 3), np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, "PNG")
    return buffer.getvalue()


def decode(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_maps_and_answer_match_the_tutorial_network_computed_by_hand(mnist):
    loaded = load_weights("lenet")
    image = mnist.test.images[0, 0].numpy()
    explained = explain_digit(image, loaded)
    w = {k: v.detach() for k, v in loaded.model.state_dict().items()}
    norm = loaded.normalization
    x = (torch.from_numpy(image).float() / 255 - norm.mean).div(norm.std).view(1, 1, 28, 28)
    conv1 = F.conv2d(x, w["features.0.weight"], w["features.0.bias"])
    pool1 = F.max_pool2d(torch.sigmoid(conv1), 2)
    conv2 = F.conv2d(pool1, w["features.3.weight"], w["features.3.bias"])
    pool2 = F.max_pool2d(torch.sigmoid(conv2), 2)
    hidden = torch.sigmoid(
        F.linear(pool2.flatten(1), w["classifier.1.weight"], w["classifier.1.bias"])
    )
    hidden = torch.sigmoid(F.linear(hidden, w["classifier.3.weight"], w["classifier.3.bias"]))
    logits = F.linear(hidden, w["classifier.5.weight"], w["classifier.5.bias"])[0]

    assert [(m.name, m.kind, m.maps.shape) for m in explained.layers] == [
        ("features.0", "convolution", (6, 24, 24)),
        ("features.2", "pooling", (6, 12, 12)),
        ("features.3", "convolution", (16, 8, 8)),
        ("features.5", "pooling", (16, 4, 4)),
    ]
    for maps, reference in zip(explained.layers, (conv1, pool1, conv2, pool2)):
        np.testing.assert_allclose(maps.maps, reference[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(explained.filters, w["features.0.weight"].numpy())
    assert explained.filters_layer == "features.0"
    assert explained.digit == int(logits.argmax()) == int(mnist.test.labels[0])
    expected = torch.softmax(logits / loaded.temperature, 0).numpy()
    np.testing.assert_allclose(explained.probabilities, expected, atol=1e-6)
    assert explained.confidence == pytest.approx(expected.max(), abs=1e-6)


def test_saliency_is_the_size_of_the_answer_gradient_by_finite_differences(mnist):
    loaded = load_weights("lenet")  # sigmoid: smooth, so central differences are accurate
    # Faint noise on the black background: without it, pooling windows over the background
    # hold exact ties, where the max (and so the finite difference) is not differentiable.
    noise = np.random.default_rng(1).integers(0, 4, (28, 28))
    image = np.clip(mnist.test.images[1, 0].numpy() + noise, 0, 255).astype(np.uint8)
    explained = explain_digit(image, loaded)
    saliency = explained.saliency
    assert saliency.shape == (28, 28) and saliency.min() >= 0 and saliency.max() == 1
    model = create_model("lenet").double().eval()
    model.load_state_dict(loaded.model.state_dict())
    norm = loaded.normalization
    x = ((torch.from_numpy(image).double() / 255 - norm.mean) / norm.std).view(1, 1, 28, 28)

    def slope(row, col, eps=1e-4):
        step = torch.zeros_like(x)
        step[0, 0, row, col] = eps
        with torch.no_grad():
            up = model(x + step)[0, explained.digit]
            down = model(x - step)[0, explained.digit]
        return abs(float(up - down)) / (2 * eps)

    peak = np.unravel_index(saliency.argmax(), saliency.shape)
    rng = np.random.default_rng(0)
    pixels = [tuple(p) for p in rng.integers(0, 28, (12, 2))]
    pixels += [np.unravel_index(i, (28, 28)) for i in np.argsort(saliency.ravel())[-6:-1]]
    reference = slope(*peak)
    for row, col in pixels:
        assert saliency[row, col] == pytest.approx(slope(row, col) / reference, abs=2e-3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_explained_and_sent_as_json(name, mnist, tmp_path):
    torch.manual_seed(0)
    model = create_model(name)
    card = {"model": name, "normalization": {"mean": 0.1307, "std": 0.3081}}
    loaded = load_weights(save_weights(tmp_path / "w.safetensors", model, card))
    picture = paper_png(mnist.test.images[2, 0].numpy())
    loaded.model.train()  # a shared model is left as it was found: mode, and no hooks
    explained = explain(picture, loaded)
    assert loaded.model.training
    assert not any(m._forward_hooks for m in loaded.model.modules())

    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, SparseConv2d))]
    pools = [m for m in model.modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, Subsampling))]
    assert len(explained.layers) == len(convs) + len(pools)
    assert (explained.filters is None) == (not convs)

    sent = json.loads(json.dumps(explained.to_dict()))  # plain JSON values only
    assert sent["model"] == name and 0 <= sent["digit"] <= 9
    assert len(sent["probabilities"]) == 10 and sum(sent["probabilities"]) == pytest.approx(
        1, abs=1e-4
    )
    assert sent["digit"] == int(np.argmax(sent["probabilities"]))
    np.testing.assert_array_equal(decode(sent["input"]["png"]), preprocess(picture).image)
    assert sent["box"] == list(preprocess(picture).box)
    values = np.array(sent["saliency"]["values"])
    assert values.shape == (28, 28) and values.max() == 1.0
    assert decode(sent["saliency"]["png"]).shape == (28, 28)
    for layer, maps in zip(sent["layers"], explained.layers):
        assert layer["shape"] == list(maps.maps.shape) and len(layer["png"]) == layer["shape"][0]
        assert all(decode(p).shape == tuple(layer["shape"][1:]) for p in layer["png"])
        lo, hi = layer["scale"]
        assert lo == pytest.approx(maps.maps.min(), abs=1e-5) and hi >= lo
    if convs:
        first = convs[0].weight
        assert sent["filters"]["shape"] == list(first.shape)
        assert [decode(p).shape for p in sent["filters"]["png"]] == [tuple(first.shape[2:])] * len(
            first
        )
    else:
        assert sent["filters"] is None and sent["layers"] == []


def test_explain_uses_the_shared_preprocessing_and_refuses_a_blank_page(mnist):
    picture = paper_png(mnist.test.images[3, 0].numpy())
    explained = explain(picture, "lenet-relu")
    digit = preprocess(picture)
    np.testing.assert_array_equal(explained.image, digit.image)
    assert explained.digit == int(mnist.test.labels[3])
    blank = io.BytesIO()
    Image.new("L", (60, 60), 255).save(blank, "PNG")
    with pytest.raises(ImageError, match="no digit found"):
        explain(blank.getvalue(), "lenet-relu")


def test_the_cli_draws_without_a_display_and_json_needs_no_matplotlib(mnist, tmp_path):
    picture = tmp_path / "seven.png"
    picture.write_bytes(paper_png(mnist.test.images[0, 0].numpy()))
    out = tmp_path / "seven-explained.png"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"  # an interactive backend that would need a display
    script = (
        "import sys; from lenet.cli import main\n"
        f"rc = main(['explain', {str(picture)!r}, '--weights', 'lenet', '--out', {str(out)!r}])\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "sys.modules['matplotlib'] = None  # from here on, as if matplotlib were not installed\n"
        f"rc += main(['explain', {str(picture)!r}, '--weights', 'lenet', '--json'])\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text, json_line = done.stdout.strip().split("\n", 2)[:2], done.stdout.strip().splitlines()[-1]
    assert text[0].startswith(f"{picture}: 7 ")
    # 16 x (2.8 + 1.5 per row: filters and 4 layers of maps) inches at 100 dpi.
    assert Image.open(out).size == (1600, 1030)
    sent = json.loads(json_line)
    assert sent["file"] == str(picture) and sent["digit"] == 7 and len(sent["layers"]) == 4


def test_the_cli_refuses_to_write_a_png_under_another_name(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lenet", "explain", "x.png", "--out", str(tmp_path / "e.jpg")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "name it .png" in done.stderr
    assert not (tmp_path / "e.jpg").exists()
