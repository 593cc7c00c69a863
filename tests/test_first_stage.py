"""The compiled first stage (lenet/first_stage.py, _first_stage.c) against PyTorch's kernels."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lenet import first_stage
from lenet.models import TrainingView, create_model

built = pytest.mark.skipif(first_stage.variant() is None, reason="the kernel is not built here")


def test_the_kernel_is_built_on_linux():
    # setup.py builds it wherever there is a C compiler; every Linux machine of this project
    # has one, so a silent fallback here would hide a broken build.
    if not sys.platform.startswith("linux"):
        pytest.skip("built where a C compiler is found; only required on Linux")
    assert first_stage.variant() in ("avx2", "plain")
    assert first_stage.available()


def reference(x, conv):
    """PyTorch's own: the convolution, then 2x2 max-pooling."""
    return F.max_pool2d(F.conv2d(x, conv.weight, conv.bias), 2, 2)


def both(x, conv, grad):
    """Pooled maps and weight and bias gradients, PyTorch's way and the kernel's."""
    results = []
    for use_kernel in (False, True):
        layer = copy.deepcopy(conv)
        out = first_stage.conv_pool(x, layer) if use_kernel else reference(x, layer)
        out.backward(grad)
        results.append((out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone()))
    return results


def assert_same(results, rel=1e-5):
    (out, gw, gb), (out2, gw2, gb2) = results
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-5 * max(1.0, float(out.abs().max())))
    for got, expected in ((gw2, gw), (gb2, gb)):
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= rel * scale + 1e-6


@built
@pytest.mark.parametrize("count", [1, 3, 16, 129])
def test_pooled_maps_and_gradients_match_pytorchs(count):
    torch.manual_seed(count)
    conv = nn.Conv2d(1, 6, 5)
    x = torch.randn(count, 1, 28, 28) * 2
    x[:, :, :6] = -0.4242  # a flat background band: exact ties in every window there
    grad = torch.randn(count, 6, 12, 12)
    results = both(x, conv, grad)
    assert_same(results)
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)


@built
def test_ties_go_to_the_first_pixel_in_row_order_as_in_pytorch():
    # One tap: each convolution output is one input pixel, so every 2x2 block of equal pixels
    # is a window of exact ties whose pixels see different patches (the gradient of every
    # other tap tells which pixel won).
    conv = nn.Conv2d(1, 6, 5)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, 2, 2] = torch.arange(1.0, 7.0)
    x = torch.randn(2, 1, 28, 28)
    block = torch.randn(2, 1, 12, 12).repeat_interleave(2, 2).repeat_interleave(2, 3)
    x[:, :, 2:26, 2:26] = block  # equal pixels in each window of the maps
    grad = torch.randn(2, 6, 12, 12)
    (out, gw, gb), (out2, gw2, gb2) = both(x, conv, grad)
    assert torch.equal(out2, out)
    torch.testing.assert_close(gw2, gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb2, gb, rtol=1e-5, atol=1e-5)


@built
def test_a_nan_wins_its_window_as_in_pytorch():
    conv = nn.Conv2d(1, 6, 5)
    x = torch.randn(1, 1, 28, 28)
    x[0, 0, 10, 10] = float("nan")
    with torch.no_grad():
        expected = reference(x, conv)
        got = first_stage.conv_pool(x, conv)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.isnan(got).any()


@built
def test_gradients_are_the_same_bits_every_time():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 6, 5)
    x, grad = torch.randn(64, 1, 28, 28), torch.randn(64, 6, 12, 12)
    runs = []
    for _ in range(2):
        layer = copy.deepcopy(conv)
        first_stage.conv_pool(x, layer).backward(grad)
        runs.append((layer.weight.grad, layer.bias.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@built
def test_lenet_training_steps_run_through_the_kernel_and_match_pytorch(monkeypatch):
    torch.manual_seed(0)
    model = create_model("lenet").to(memory_format=torch.channels_last).train()
    twin = copy.deepcopy(model)
    x = torch.randn(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    calls = []
    original = first_stage.conv_pool
    monkeypatch.setattr(first_stage, "conv_pool", lambda *a: calls.append(1) or original(*a))
    got = TrainingView(model)(x)
    assert calls, "lenet's training step did not use the kernel"
    monkeypatch.setattr(first_stage, "enabled", False)
    expected = TrainingView(twin)(x)
    assert len(calls) == 1, "switched off, the kernel still ran"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    got.square().sum().backward()
    expected.square().sum().backward()
    for (where, p), q in zip(twin.named_parameters(), model.parameters()):
        scale = float(p.grad.abs().max())
        assert float((q.grad - p.grad).abs().max()) <= 1e-4 * scale + 1e-7, where


def test_what_the_kernel_does_not_cover_goes_to_pytorch(monkeypatch):
    conv = nn.Conv2d(1, 6, 5)
    x = torch.randn(2, 1, 28, 28)
    monkeypatch.setattr(first_stage, "_kernel", object())  # as if built, whatever this machine has
    assert first_stage.covers(x, conv)
    assert not first_stage.covers(x.double(), conv)
    assert not first_stage.covers(x.requires_grad_(), conv)  # its gradient is not computed
    assert not first_stage.covers(torch.randn(2, 1, 32, 32), conv)
    assert not first_stage.covers(torch.randn(2, 3, 28, 28), nn.Conv2d(3, 6, 5))
    assert not first_stage.covers(torch.randn(2, 1, 28, 28), nn.Conv2d(1, 6, 5, bias=False))
    assert not first_stage.covers(torch.randn(2, 1, 28, 28), nn.Conv2d(1, 6, 5, padding=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not first_stage.covers(torch.randn(2, 1, 28, 28), conv)
    monkeypatch.setattr(first_stage, "enabled", False)
    assert not first_stage.covers(torch.randn(2, 1, 28, 28), conv)


def test_without_the_kernel_lenet_trains_with_pytorchs_kernels(monkeypatch):
    # An install where setup.py could not build it: the same step, PyTorch's way.
    monkeypatch.setattr(first_stage, "_kernel", None)
    assert not first_stage.available() and first_stage.variant() is None
    torch.manual_seed(0)
    model = create_model("lenet").train()
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(TrainingView(model)(x), model(x), rtol=0, atol=1e-5)


@built
@pytest.mark.parametrize("switched_on", [True, False])
def test_the_model_card_says_whether_the_kernel_trained_it(
    small_mnist, tmp_path, monkeypatch, switched_on
):
    from lenet.config import resolve_config
    from lenet.training import train

    monkeypatch.setattr(first_stage, "enabled", switched_on)
    config = resolve_config(
        "lenet", epochs=1, train_limit=256, device="cpu", out=str(tmp_path / "run")
    )
    result = train(config, dataset=small_mnist, progress=False)
    assert result.card["first_stage_kernel"] == (first_stage.variant() if switched_on else None)
